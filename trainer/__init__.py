"""elmforge trainer: the OpenELM model and its DeepSpeed training loop (no Ray imports)."""
