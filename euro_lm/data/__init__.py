"""The data the trainer needs: tokenizer, training batches, validation sets."""

import dataclasses
import os

import grain
import ml_collections
import numpy as np

from euro_lm.data import corpus
from euro_lm.data import pipeline
from euro_lm.data.tokenizer import Tokenizer
from euro_lm.data.tokenizer import train_sentencepiece
from euro_lm.errors import ConfigError

# Bounds the text a tokenizer trains on, shared equally by the languages.
_TOKENIZER_TRAINING_CHARS = 20_000_000
_TOKENIZER_TYPES = ('bpe', 'unigram')


@dataclasses.dataclass
class Data:
  """What `make_data` builds for one process."""

  tokenizer: Tokenizer
  # Per-process batches (see euro_lm.data.pipeline); the trainer calls iter().
  train: grain.IterDataset
  # Language tag -> eval batches, the same count and shape on every process.
  valid: dict[str, list[dict[str, np.ndarray]]]
  languages: list[str]


def make_data(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Data:
  """Builds the tokenizer and this process's train and validation data.

  With `data.tokenizer_path` empty, the tokenizer is
  `<workdir>/tokenizer.model`: trained from the training split on first use
  and reused afterwards. Training is deterministic, so processes that each
  train it get the same model.
  """
  if config.data.corpus != 'embedded':
    raise ConfigError(
        f"data.corpus={config.data.corpus!r} is not supported; use 'embedded'."
    )
  global_batch_size = config.train.global_batch_size
  if global_batch_size % process_count:
    raise ConfigError(
        f'train.global_batch_size={global_batch_size} is not divisible by'
        f' the {process_count} processes.'
    )
  docs = corpus.select_languages(
      corpus.load_embedded_corpus(), config.data.languages
  )
  train, valid = corpus.split_train_valid(docs, config.data.valid_fraction)
  tokenizer = _load_or_train_tokenizer(config, workdir, train)
  batch_size = global_batch_size // process_count
  seq_len = config.train.seq_len
  train_dataset = pipeline.make_train_dataset(
      [doc for tag in sorted(train) for doc in train[tag]],
      tokenizer,
      seq_len=seq_len,
      batch_size=batch_size,
      seed=config.data.seed,
      process_index=process_index,
      process_count=process_count,
  )
  valid_batches = {
      tag: pipeline.make_eval_batches(
          valid[tag],
          tokenizer,
          seq_len=seq_len,
          batch_size=batch_size,
          max_batches=config.train.eval_batches,
          process_index=process_index,
          process_count=process_count,
      )
      for tag in sorted(valid)
  }
  return Data(tokenizer, train_dataset, valid_batches, sorted(docs))


def _load_or_train_tokenizer(
    config: ml_collections.ConfigDict,
    workdir: str,
    train: dict[str, list[str]],
) -> Tokenizer:
  """Loads the configured tokenizer, or trains and saves the workdir's one."""
  vocab_size = config.model.vocab_size
  path = config.data.tokenizer_path or os.path.join(workdir, 'tokenizer.model')
  if config.data.tokenizer_path or os.path.exists(path):
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.vocab_size != vocab_size:
      raise ConfigError(
          f'The tokenizer {path} has vocab size {tokenizer.vocab_size}, but'
          f' model.vocab_size is {vocab_size}.'
      )
    return tokenizer
  if config.data.tokenizer_type not in _TOKENIZER_TYPES:
    raise ConfigError(
        f'data.tokenizer_type={config.data.tokenizer_type!r} is not one of'
        f' {_TOKENIZER_TYPES}.'
    )
  texts = balanced_texts(train, _TOKENIZER_TRAINING_CHARS // len(train))
  print(
      f'Training a {vocab_size}-piece {config.data.tokenizer_type} tokenizer'
      f' on {sum(map(len, texts)):,} characters in {len(train)} languages'
      f' -> {path}'
  )
  return train_sentencepiece(
      texts,
      path,
      vocab_size=vocab_size,
      model_type=config.data.tokenizer_type,
  )


def balanced_texts(
    docs_by_lang: dict[str, list[str]], chars_per_language: int
) -> list[str]:
  """The first `chars_per_language` characters of each language's documents."""
  texts = []
  for tag in sorted(docs_by_lang):
    budget = chars_per_language
    for doc in docs_by_lang[tag]:
      if budget <= 0:
        break
      texts.append(doc[:budget])
      budget -= len(doc)
  return texts
