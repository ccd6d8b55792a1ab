"""The model side of a run: the 4-bit base and its LoRA layers, the attention kernels, a starting
adapter.
"""
