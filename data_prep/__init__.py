"""Code folders and instruction sets to tokenized, packed training rows."""
