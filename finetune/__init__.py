"""4-bit loading, LoRA training, merging, generation and evaluation on the kit's model."""
