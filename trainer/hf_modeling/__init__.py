"""Self-contained transformers remote code for OpenELM, shipped next to exported weights (trust_remote_code)."""
