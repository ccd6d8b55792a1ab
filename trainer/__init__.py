"""kubetune.trainer."""
