"""Training data, from a URI to the records TRL reads: read, checked line by line, shaped."""
