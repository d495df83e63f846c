"""Models built from the attention layers: the GPT language model."""
