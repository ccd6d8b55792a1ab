"""kubetune.local."""
