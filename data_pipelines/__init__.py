"""elmforge data pipelines: text sources -> tokenizer -> packed samples -> WebDataset shards -> loader."""
