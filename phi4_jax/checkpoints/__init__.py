"""Weights on disk: Hugging Face safetensors (read and write), phi4_jax's Orbax folders, conversion, loading."""
