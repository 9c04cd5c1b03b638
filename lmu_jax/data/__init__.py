"""Data: named corpora (corpora.py), byte and SentencePiece tokenizers (tokenizers.py), the token cache
and deterministic window batches (pipeline.py), and the `lmu-jax data` commands (commands.py)."""
