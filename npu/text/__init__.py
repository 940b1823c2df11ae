"""Text: the tokenizer (tokenizer.json or vocab + merges), chat templates, and the
UTF-8-safe incremental detokenizer. Knows nothing of graphs or sessions."""
