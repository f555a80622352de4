"""Offline tools that make training's inputs; training never imports them.

sources: documents of raw JSONL/Parquet files; shards: raw files -> a prepared
directory (euro_lm.data.prepared reads it); source_flags: the absl flags that
describe raw files; tokenizer_training: a language-balanced sample and a
tokenizer trained on it; fertility: what each language pays in tokens.
"""
