"""kubetune.operator."""
