"""What runs in training: tokenizer, languages, mixture, streams, pipeline.

`dataset.make_data` builds a run's tokenizer and batches; the offline tools
that make its inputs (raw-file readers, preparation, fertility) are in
`euro_lm.data.prepare`.
"""
