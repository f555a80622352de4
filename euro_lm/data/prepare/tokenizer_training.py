"""Training a tokenizer on a language-balanced sample, and its fertility report.

`train_tokenizer` is `python -m euro_lm.train_tokenizer` as a function, for
notebooks: it samples the corpus's training split, trains a SentencePiece
model and writes DIR/tokenizer.model and DIR/fertility.json (fertility on
held-out text).

The corpus is the embedded one (held-out parallel text, parity by token
counts) or, with `input_globs` (--input) and a `sources.TextSource`, your own
JSONL/Parquet files, read in two streaming passes (held-out documents, parity
per character); see `sample_files`.
"""

import collections
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

from euro_lm.data import corpus
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.data.prepare import fertility, sources
from euro_lm.errors import ConfigError, DataError

# How languages share a tokenizer's training sample (see `sampling_budgets`).
SAMPLING = ('uniform', 'natural', 'temperature')


def train_tokenizer(
    output_dir: str,
    *,
    corpus_name: str = 'embedded',
    input_globs: Sequence[str] = (),
    source: sources.TextSource | None = None,
    vocab_size: int = 8192,
    model_type: str = 'bpe',
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    special_tokens: Sequence[str] = ('<|im_start|>', '<|im_end|>'),
    sampling: str = 'uniform',
    temperature: float = 3.0,
    chars_per_language: int = 1_000_000,
    languages: str = '',
    heldout_fraction: float = 0.1,
    seed: int = 0,
    log=print,
) -> tuple[tokenizer_lib.Tokenizer, dict]:
  """Trains a tokenizer into `output_dir` and writes its fertility report.

  Arguments are the CLI's flags; error messages name them as flags. With
  `input_globs` (--input) the corpus is those files, read as `source` says
  (--format, --text_field, --language_field or --language, --strict; see
  `sample_files`), instead of the embedded one.

  Returns:
    The tokenizer and the report (see `fertility.fertility_report`), with
    `training`: the sampling and the characters each language trained on;
    with --input also the globs, each language's documents and the bad
    records by file.

  Raises:
    UserError: a bad flag, e.g. a vocab_size the sample cannot fill; with
      --input also a glob that matches no file, an unreadable file, or a bad
      record of a strict source.
  """
  if corpus_name != 'embedded':
    raise ConfigError(f"--corpus={corpus_name!r}: only 'embedded' exists.")
  if model_type not in tokenizer_lib.MODEL_TYPES:
    raise ConfigError(f'--model_type={model_type!r} is not one of {tokenizer_lib.MODEL_TYPES}.')
  if not 0 < heldout_fraction <= 0.5:
    raise ConfigError(f'--heldout_fraction must be in (0, 0.5], got {heldout_fraction}.')
  if chars_per_language <= 0:
    raise ConfigError(f'--chars_per_language must be positive, got {chars_per_language}.')
  if not 0 < character_coverage <= 1:
    raise ConfigError(f'--character_coverage must be in (0, 1], got {character_coverage}.')
  if sampling == 'temperature' and not temperature > 0:
    raise ConfigError(f'--temperature must be positive, got {temperature}.')
  if input_globs:
    if source is None:
      raise ConfigError('--input needs --language or --language_field.')
    sample = sample_files(
        input_globs,
        source,
        chars_per_language=chars_per_language,
        sampling=sampling,
        temperature=temperature,
        languages=languages,
        heldout_fraction=heldout_fraction,
        log=log,
    )
    texts = [t for tag in sorted(sample.texts) for t in sample.texts[tag]]
    heldout, budgets, parallel = sample.heldout, sample.budgets, False
    heldout_note = (
        f'Fertility on {sum(map(len, heldout.values())):,} held-out documents'
        f' (1 in {round(1 / heldout_fraction)} per language, never'
        ' trained on): not parallel text, so parity is tokens per character'
        ' relative to English.'
    )
    about_corpus = {
        'corpus': 'input',
        'input': list(input_globs),
        'documents': sample.documents,
        'bad_records': {b.path: b.to_json() for b in sample.bad_records},
        'truncated': {b.path: b.truncation_json() for b in sample.truncated},
    }
  else:
    texts, heldout, budgets = _sample_embedded(
        chars_per_language,
        sampling,
        temperature,
        languages,
        heldout_fraction,
        seed,
    )
    parallel = True
    heldout_note = (
        f'Fertility on {len(heldout[min(heldout)])} held-out messages that'
        f' Django translates into all {len(heldout)} languages.'
    )
    about_corpus = {'corpus': corpus_name}
  path = os.path.join(output_dir, 'tokenizer.model')
  log(
      f'Training a {vocab_size}-piece {model_type} tokenizer on'
      f' {sum(map(len, texts)):,} characters in {len(budgets)} languages'
      f' ({sampling} sampling) -> {path}'
  )
  tokenizer = tokenizer_lib.train_sentencepiece(
      cut_long(texts),
      path,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=byte_fallback,
      user_defined_symbols=[t for t in special_tokens if t],
      character_coverage=character_coverage,
      vocab_size_name='--vocab_size',
  )
  rare = rare_piece_share(path, texts, special_tokens)
  if rare > RARE_PIECE_WARNING:
    log(
        f'warning: --vocab_size={vocab_size} is large for the sample: {rare:.1%} of the'
        f' learned pieces occur fewer than {RARE_PIECE_COUNT} times in the'
        f' {sum(map(len, texts)):,} characters they were learned from (more than'
        f' {RARE_PIECE_WARNING:.0%}); sample more text (--chars_per_language) or choose a'
        ' smaller --vocab_size.'
    )
  log(heldout_note)
  report = fertility.fertility_report(tokenizer, heldout, parallel=parallel)
  report['training'] = {
      **about_corpus,
      'model_type': model_type,
      'character_coverage': character_coverage,
      'rare_piece_share': rare,
      'sampling': sampling,
      'temperature': temperature if sampling == 'temperature' else None,
      'characters': budgets,
  }
  fertility.write_report(report, os.path.join(output_dir, 'fertility.json'))
  return tokenizer, report


# train_tokenizer warns when more than RARE_PIECE_WARNING of the learned pieces occur fewer
# than RARE_PIECE_COUNT times in their own training sample: pieces learned from a handful
# of occurrences, a vocabulary the sample cannot fill with useful pieces. (The embedded
# corpus, ~0.9M characters: 6.5% at 8192 pieces, 14% at 16000.)
RARE_PIECE_COUNT = 3
RARE_PIECE_WARNING = 0.1


def rare_piece_share(
    model_path: str, texts: Sequence[str], user_defined: Sequence[str] = ()
) -> float:
  """The share of a SentencePiece model's learned pieces (not control, unknown, byte or
  `user_defined` ones) that occur fewer than RARE_PIECE_COUNT times in `texts`."""
  processor = spm.SentencePieceProcessor(model_file=model_path)
  size = processor.vocab_size()
  given = {processor.PieceToId(p) for p in user_defined}
  ids = np.fromiter((i for e in processor.EncodeAsIds(list(texts)) for i in e), np.int64)
  counts = np.bincount(ids, minlength=size)
  learned = np.array(
      [
          not (
              processor.IsControl(i) or processor.IsUnknown(i) or processor.IsByte(i) or i in given
          )
          for i in range(size)
      ]
  )
  return float((counts[learned] < RARE_PIECE_COUNT).sum() / max(learned.sum(), 1))


def sampling_budgets(
    chars_by_language: Mapping[str, int],
    chars_per_language: int,
    sampling: str = 'uniform',
    temperature: float = 1.0,
) -> dict[str, int]:
  """Characters to sample from each language to train a tokenizer on.

  The languages share `chars_per_language * len(chars_by_language)`
  characters: 'uniform' gives each `chars_per_language`; 'natural' splits the
  total in proportion to each language's size n; 'temperature' in proportion
  to n ** (1 / temperature), which flattens the mix as temperature grows.
  Shares round down, and a language never gives more than it has: what it
  lacks is not handed to the others, so small languages are not drowned out.

  Args:
    chars_by_language: language -> characters available.
    chars_per_language: the average budget per language.
    sampling: one of SAMPLING.
    temperature: used by 'temperature' only.

  Returns:
    language -> characters to sample, in the order of `chars_by_language`.

  Raises:
    ConfigError: a non-positive budget or temperature, an unknown sampling,
      or no text at all.
  """
  if chars_per_language <= 0:
    raise ConfigError(f'chars_per_language must be positive, got {chars_per_language}.')
  if sampling not in SAMPLING:
    raise ConfigError(f'sampling={sampling!r} is not one of {SAMPLING}.')
  if sampling == 'temperature' and not temperature > 0:
    raise ConfigError(f'temperature must be positive, got {temperature}.')
  if not any(chars_by_language.values()):
    raise ConfigError('There is no text to sample a tokenizer corpus from.')
  if sampling == 'uniform':
    shares = {tag: chars_per_language for tag in chars_by_language}
  else:
    exponent = 1.0 if sampling == 'natural' else 1.0 / temperature
    weights = {tag: n**exponent for tag, n in chars_by_language.items()}
    total = chars_per_language * len(chars_by_language)
    norm = sum(weights.values())
    shares = {tag: math.floor(total * w / norm) for tag, w in weights.items()}
  return {tag: min(shares[tag], n) for tag, n in chars_by_language.items()}


def _sample_embedded(
    chars_per_language,
    sampling,
    temperature,
    languages,
    heldout_fraction,
    seed,
):
  """(texts, heldout, budgets) of the embedded corpus; heldout is parallel."""
  docs = _select_languages(corpus.load_embedded_corpus(), languages)
  train, _ = corpus.split_train_valid(docs, heldout_fraction)
  heldout, heldout_lines = fertility.embedded_parallel_heldout(sorted(docs), heldout_fraction)
  train = {tag: [_drop_lines(doc, heldout_lines[tag]) for doc in train[tag]] for tag in train}
  budgets = sampling_budgets(
      {tag: sum(map(len, d)) for tag, d in train.items()},
      chars_per_language,
      sampling,
      temperature,
  )
  rng = np.random.default_rng(seed)
  texts = []
  for tag in sorted(train):
    # A shuffled order samples every catalog, not just the first ones.
    order = rng.permutation(len(train[tag]))
    shuffled = [train[tag][i] for i in order]
    texts += tokenizer_lib.balanced_texts({tag: shuffled}, budgets[tag])
  return texts, heldout, budgets


def _select_languages(by_language: dict, spec: str) -> dict:
  try:
    return corpus.select_languages(by_language, spec)
  except ConfigError as e:
    # select_languages names the config field, which here is a flag.
    raise ConfigError(str(e).replace('data.languages', '--languages', 1)) from e


def _drop_lines(doc: str, lines: set[str]) -> str:
  return '\n'.join(line for line in doc.split('\n') if line not in lines)


# SentencePiece skips a text over its max_sentence_length (1 MiB of UTF-8,
# which train_sentencepiece sets) without a word; cut texts to at most this
# many characters (4 bytes each at most) so that all of the sample trains.
MAX_TEXT_CHARS = (1 << 20) // 4


def cut_long(texts: Sequence[str]) -> Iterator[str]:
  """The texts, each cut into pieces of at most MAX_TEXT_CHARS characters."""
  for text in texts:
    for start in range(0, len(text), MAX_TEXT_CHARS):
      yield text[start : start + MAX_TEXT_CHARS]


class FileSample(NamedTuple):
  """A tokenizer sample of raw files (see `sample_files`)."""

  texts: dict[str, list[str]]  # language -> training texts
  heldout: dict[str, list[str]]  # language -> held-out documents
  budgets: dict[str, int]  # language -> characters in `texts`
  documents: dict[str, int]  # language -> documents in the files
  bad_records: list[sources.BadRecords]  # of the files that have some
  truncated: list[sources.BadRecords] = []  # the reports of truncated files


@dataclasses.dataclass
class _Count:
  """One language's documents, counted in the first pass."""

  documents: int = 0
  characters: int = 0
  every_kth: int = 0  # Characters of documents k-1, 2k-1, ... (from 0).
  last: int = 0  # Characters of the last document.

  def training_characters(self, every: int) -> int:
    # What split_train_valid holds out: every k-th, or else the last.
    held_out = self.every_kth if self.documents >= every else self.last
    return self.characters - held_out


def sample_files(
    patterns: Sequence[str],
    source: sources.TextSource,
    *,
    chars_per_language: int,
    sampling: str = 'uniform',
    temperature: float = 3.0,
    languages: str = '',
    heldout_fraction: float = 0.1,
    log=print,
) -> FileSample:
  """A language-balanced tokenizer sample of raw files, in two streaming passes.

  Per language, documents k-1, 2k-1, ... (counting from 0 in file order:
  sorted paths, then records; k = round(1 / heldout_fraction)) are held out,
  or the last one when there are fewer than k, as `corpus.split_train_valid`
  does. The first pass counts each language's documents and training
  characters, from which `sampling_budgets` makes budgets. The
  second takes each language's training documents in file order until its
  budget is filled (cutting the last one short), keeps the held-out
  documents it passes meanwhile (at least one), and stops reading once every
  language is done. Memory holds the sample and counters, never a file.

  Arguments are `train_tokenizer`'s, which checks them; errors name flags.

  Raises:
    UserError: a glob that matches no file, an unreadable file, a bad record
      of a strict source, no usable document, an unknown or absent language
      in `languages`, or a language with a single document.
  """
  try:
    paths = sources.expand_globs(patterns)
  except DataError as e:
    raise DataError(f'--input: {e}') from e
  every = round(1 / heldout_fraction)
  log(f'Counting the documents of each language in {len(paths)} file(s).')
  counts = collections.defaultdict(_Count)
  reports = []
  per_file = collections.Counter()  # path -> documents
  for doc in _documents(paths, source, reports, per_file):
    count = counts[doc.language]
    count.documents += 1
    count.characters += len(doc.text)
    count.last = len(doc.text)
    if count.documents % every == 0:
      count.every_kth += len(doc.text)
  for report in reports:
    if warning := report.warning(per_file[report.path]):
      log(f'warning: {warning}')
  bad_records = [b for b in reports if b.total]
  for bad in bad_records:
    log(f'Skipped bad records: {bad}')
  log(
      f'{sum(c.documents for c in counts.values()):,} documents in'
      f' {len(counts)} languages; {sum(b.total for b in bad_records):,} bad'
      f' records skipped in {len(bad_records)} of {len(paths)} file(s).'
  )
  if not counts:
    raise DataError(
        f'--input: the {len(paths)} file(s) hold no usable document'
        + (f' (first bad: {bad_records[0]})' if bad_records else '.')
    )
  counts = _select_languages(counts, languages)
  for tag, count in sorted(counts.items()):
    if count.documents < 2:
      raise ConfigError(
          f'--input has a single {tag} document; holding one out for the'
          f' fertility report needs 2. Leave {tag} out with --languages.'
      )
  budgets = sampling_budgets(
      {t: c.training_characters(every) for t, c in sorted(counts.items())},
      chars_per_language,
      sampling,
      temperature,
  )
  texts = {tag: [] for tag in budgets}
  heldout = {tag: [] for tag in budgets}
  left = dict(budgets)  # Characters still to take.
  seen = dict.fromkeys(budgets, 0)
  pending = set(budgets)  # Languages short of text or of held-out text.
  # Bad records were counted (or raised) in the first pass.
  for doc in _documents(paths, source, []):
    tag = doc.language
    if tag not in pending:
      continue
    index, n = seen[tag], counts[tag].documents
    seen[tag] += 1
    if index % every == every - 1 or (n < every and index == n - 1):
      heldout[tag].append(doc.text)
    elif left[tag]:
      texts[tag].append(doc.text[: left[tag]])
      left[tag] -= len(texts[tag][-1])
    if not left[tag] and heldout[tag]:
      pending.remove(tag)
      if not pending:
        break
  documents = {tag: counts[tag].documents for tag in budgets}
  truncated = [b for b in reports if b.truncated]
  return FileSample(texts, heldout, budgets, documents, bad_records, truncated)


def _documents(
    paths: Sequence[str],
    source: sources.TextSource,
    bad_records: list[sources.BadRecords],
    per_file: collections.Counter | None = None,
) -> Iterator[sources.Document]:
  """The files' documents in turn; appends each file's bad-record report and
  counts each file's documents in `per_file`."""
  for path in paths:
    documents, bad = source.read(path)
    bad_records.append(bad)
    for document in documents:
      if per_file is not None:
        per_file[path] += 1
      yield document
