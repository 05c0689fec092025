"""Text <-> token ids: tokenizers, chat templates, stop tokens and stop strings, streaming detokenization."""
