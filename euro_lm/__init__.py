"""euro_lm: open JAX pretraining for European language models."""

__version__ = '0.1.0'
