"""kubetune.api."""
