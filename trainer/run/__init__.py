"""The run itself: the recipe and the loop around TRL's trainer, checkpoints and resume, ranks,
progress, tracking.
"""
