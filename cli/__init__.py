"""kubetune.cli."""
