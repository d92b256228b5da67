"""Data: image loading, synthetic and packaged datasets, tokenizers."""
