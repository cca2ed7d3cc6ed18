"""Token data for training: the shard format, the GPT-2 tokenizer, corpora on disk, and the loader.

Nothing in this package imports the model; train.py and sample.py import from here.
"""
