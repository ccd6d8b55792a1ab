"""The run's plan, resolved once: memory and speed for this card, the trainer arguments, the
preflight estimate.
"""
