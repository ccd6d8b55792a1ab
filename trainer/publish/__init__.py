"""What a finished run leaves behind and where it goes: files, digests, result.json, registries,
merges.
"""
