"""Token data: the shard format, the loader and the GPT-2 tokenizer; nothing here imports the model."""
