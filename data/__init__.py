"""Data: corpus readers, SentencePiece tokenizers and Grain pipelines."""
