"""4-bit loading, LoRA training, merging, generation and evaluation on the kit's model."""

# First, so that model.loading's logging set-up precedes peft's and transformers' import of
# bitsandbytes.
import model.loading  # noqa: F401
