"""Tokenizer fertility: what each language pays in tokens for the same text.

A tokenizer that needs twice the tokens for Greek as for English makes Greek
text twice as expensive to train on and leaves it half the context. The
report measures, per language, tokens per whitespace word and per character,
UTF-8 bytes per token, parity against a reference language (Petrov et al.,
2023, "Language Model Tokenizers Introduce Unfairness Between Languages"), and
how often the tokenizer falls back to bytes, to its unknown token, or to pieces
the text hardly uses. `python -m euro_lm.evaluate_tokenizer` and
`python -m euro_lm.train_tokenizer` both report with this module.

Parity compares token counts, which only means something on parallel text:
the same content in every language. The embedded corpus is parallel (Django's
catalogs translate the same messages), and `embedded_parallel_heldout` aligns
it by message. For other text `parity` is tokens per character relative to the
reference (not per byte: Greek and Cyrillic letters take two bytes, Latin ones
one), and the report says which of the two it is. `parity_per_word` and
`parity_per_char` are always there: tokens per word (character) over the
reference's.

Words are whitespace-separated: for a script written without spaces (Chinese,
Japanese, Thai) a "word" is a whole phrase, and tokens per character is the
measure to read.

`format_comparison` and `plot_fertility` (matplotlib, imported lazily) put several
reports side by side, e.g. one per vocabulary size (notebooks/tokenizer.ipynb) or
one per tokenizer (`euro_lm.evaluate_tokenizer`).
"""

import json
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from euro_lm.data import corpus, languages
from euro_lm.data.prepare import token_counter
from euro_lm.errors import ConfigError

ENGLISH = languages.canonical_language('en')

# The two meanings of `parity`, as the report labels them.
PARALLEL = 'parallel'
PER_CHAR = 'per_char'
_PARITY_MEANING = {
    PARALLEL: 'tokens / tokens of the same text in {ref} (parallel text)',
    PER_CHAR: '(tokens per character) / ({ref} tokens per character) (text not parallel)',
}
# What the report calls each metric in tables (short) and on plots (long).
METRICS = {
    'tokens_per_word': ('tokens/word', 'tokens per word (fertility)'),
    'tokens_per_char': ('tokens/char', 'tokens per character'),
    'bytes_per_token': ('bytes/token', 'UTF-8 bytes per token'),
    'chars_per_token': ('chars/token', 'characters per token'),
    'parity': ('parity', 'parity vs {ref}'),
    'parity_per_word': ('parity/word', 'parity per word vs {ref}'),
    'parity_per_char': ('parity/char', 'parity per character vs {ref}'),
    'byte_fallback_rate': ('byte fb', 'share of byte-fallback tokens'),
    'unknown_rate': ('unknown', 'share of unknown tokens'),
    'rare_piece_rate': ('rare', 'share of rare-piece tokens'),
}


def fertility_report(
    tokenizer,
    texts_by_language: Mapping[str, Sequence[str]],
    *,
    parallel: bool = False,
    reference: str = ENGLISH,
    rare_max_count: int = 1,
) -> dict:
  """Measures how `tokenizer` splits each language's texts.

  Counts are totals over a language's texts, and each ratio is a ratio of
  totals, so long texts weigh more than short ones (as they do in training).

  Args:
    tokenizer: a euro_lm Tokenizer or a `token_counter.TokenCounter`.
    texts_by_language: language tag -> texts. Encoded without bos/eos.
    parallel: the texts are translations of each other, text i of every
      language saying the same thing; parity is then a ratio of token counts.
      Otherwise it is a ratio of tokens per character.
    reference: the language parity is relative to; without it in
      `texts_by_language`, every parity is None.
    rare_max_count: a piece is rare when it occurs at most this many times in
      all the texts (every language together).

  Returns:
    A JSON-serializable dict: `parity_kind` (PARALLEL or PER_CHAR),
    `parity_meaning`, `reference`, `vocab_size`, `tokenizer` (path, kind),
    `rare_max_count`, `vocab_used` (share of the vocabulary, control tokens
    left out, that some text used) and `languages`: tag -> texts, words,
    characters, bytes, tokens, tokens_per_word, tokens_per_char,
    bytes_per_token, chars_per_token, byte_fallback_rate, unknown_rate,
    rare_piece_rate (shares of the tokens), distinct_pieces, parity,
    parity_per_word, parity_per_char. A ratio whose denominator is 0 is None.

  Raises:
    ConfigError: `parallel` texts whose languages have different text counts.
  """
  if parallel and len({len(t) for t in texts_by_language.values()}) > 1:
    counts = {tag: len(t) for tag, t in texts_by_language.items()}
    raise ConfigError(f'Parallel texts need the same number of texts per language: {counts}.')
  counter = (
      tokenizer
      if isinstance(tokenizer, token_counter.TokenCounter)
      else token_counter.counter_for(tokenizer)
  )
  stats, pieces = {}, {}  # pieces: tag -> (ids used, how often)
  total = np.zeros(counter.vocab_size, np.int64)  # each piece, over all languages
  for tag, texts in texts_by_language.items():
    texts = list(texts)
    encoded = counter.encode_batch(texts)
    ids = np.fromiter((i for e in encoded for i in e), np.int64)
    pieces[tag] = np.unique(ids, return_counts=True)
    total[pieces[tag][0]] += pieces[tag][1]
    tokens = len(ids)
    words = sum(len(t.split()) for t in texts)
    chars = sum(map(len, texts))
    num_bytes = sum(len(t.encode('utf-8')) for t in texts)
    stats[tag] = {
        'texts': len(texts),
        'words': words,
        'characters': chars,
        'bytes': num_bytes,
        'tokens': tokens,
        'tokens_per_word': _ratio(tokens, words),
        'tokens_per_char': _ratio(tokens, chars),
        'bytes_per_token': _ratio(num_bytes, tokens),
        'chars_per_token': _ratio(chars, tokens),
        'byte_fallback_rate': _ratio(int(counter.byte_fallback[ids].sum()), tokens),
        'unknown_rate': _ratio(int(counter.unknown[ids].sum()), tokens),
        'distinct_pieces': len(pieces[tag][0]),
    }
  for tag, (used, how_often) in pieces.items():
    rare = int(how_often[total[used] <= rare_max_count].sum())
    stats[tag]['rare_piece_rate'] = _ratio(rare, stats[tag]['tokens'])
  ref = stats.get(reference)
  for s in stats.values():
    # Cross-multiplied in integers until the one division, so the reference's
    # own parities are exactly 1.0.
    if ref is None:
      s['parity_per_word'] = s['parity_per_char'] = None
    else:
      s['parity_per_word'] = _ratio(s['tokens'] * ref['words'], s['words'] * ref['tokens'])
      s['parity_per_char'] = _ratio(
          s['tokens'] * ref['characters'], s['characters'] * ref['tokens']
      )
    if ref is None:
      s['parity'] = None
    elif parallel:
      s['parity'] = _ratio(s['tokens'], ref['tokens'])
    else:
      s['parity'] = s['parity_per_char']
  usable = ~counter.control
  kind = PARALLEL if parallel else PER_CHAR
  return {
      'parity_kind': kind,
      'parity_meaning': _PARITY_MEANING[kind].format(ref=reference),
      'reference': reference,
      'vocab_size': counter.vocab_size,
      'tokenizer': {'path': counter.path, 'kind': counter.kind},
      'rare_max_count': rare_max_count,
      'vocab_used': _ratio(int(((total > 0) & usable).sum()), int(usable.sum())),
      'languages': stats,
  }


def _ratio(numerator, denominator):
  return numerator / denominator if denominator else None


def format_table(report: dict) -> str:
  """The report as a console table, lowest parity first (None last)."""

  def order(item):
    tag, s = item
    return (s['parity'] is None, s['parity'] or 0.0, tag)

  columns = (
      'tokens_per_word',
      'tokens_per_char',
      'bytes_per_token',
      'parity',
      'parity_per_word',
      'parity_per_char',
      'byte_fallback_rate',
  )
  header = (
      f'{"language":<10} '
      + ' '.join(f'{METRICS[c][0]:>11}' for c in columns)
      + f' {"tokens":>9} {"words":>8}'
  )
  if report['reference'] in report['languages']:
    parity = f'parity = {report["parity_meaning"]}'
  else:
    parity = f'no parity: {report["reference"]} was not measured'
  lines = [
      f'Tokenizer fertility ({report["vocab_size"]} pieces); {parity}.',
      header,
      '-' * len(header),
  ]
  for tag, s in sorted(report['languages'].items(), key=order):
    lines.append(
        f'{tag:<10} '
        + ' '.join(f'{format_metric(c, s[c]):>11}' for c in columns)
        + f' {s["tokens"]:>9,} {s["words"]:>8,}'
    )
  return '\n'.join(lines)


def format_metric(metric: str, value) -> str:
  """A metric as a table shows it: rates in percent, parities to 3 digits, '-' for None."""
  if value is None:
    return '-'
  if metric.endswith('_rate'):
    return f'{100 * value:.2f}%'
  return f'{value:.3f}' if metric.startswith('parity') else f'{value:.2f}'


def write_report(report: dict, path: str) -> None:
  """Writes the report as JSON, atomically (a reader never sees half)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, temp_path = tempfile.mkstemp(dir=directory, suffix='.tmp')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2, ensure_ascii=False)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    os.chmod(temp_path, 0o644)
    os.replace(temp_path, path)
  except BaseException:
    os.remove(temp_path)
    raise


def embedded_parallel_heldout(
    tags: Sequence[str], heldout_fraction: float
) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
  """Held-out parallel text from the embedded corpus.

  Aligns Django's messages by msgid: English is the msgid, every other
  language its translation. Only messages without a msgctxt and translated
  into all of `tags` are aligned, so every language gets the same content; of
  those, sorted by msgid, every k-th is held out (k = round(1 /
  heldout_fraction)). Each held-out message contributes its singular form,
  the one every catalog has.

  Args:
    tags: canonical tags of the embedded corpus's languages.
    heldout_fraction: in (0, 0.5].

  Returns:
    (texts, lines): language -> the held-out messages, aligned by index; and
    language -> every line of every form of those messages, which a tokenizer
    evaluated on them must not train on (the corpus's documents join messages
    with newlines, so lines are what can be filtered out of them).

  Raises:
    ConfigError: a heldout_fraction outside (0, 0.5], or no message that all
      of `tags` translate.
  """
  if not 0 < heldout_fraction <= 0.5:
    raise ConfigError(f'heldout_fraction must be in (0, 0.5], got {heldout_fraction}.')
  aligned = _aligned_messages(tags)
  if not aligned:
    raise ConfigError(
        f'No Django message is translated into all of {", ".join(tags)}, so'
        ' there is no parallel text to measure fertility on.'
    )
  every = round(1 / heldout_fraction)
  heldout = sorted(aligned)[every - 1 :: every] or sorted(aligned)[-1:]
  texts = {tag: [aligned[m][tag][0] for m in heldout] for tag in tags}
  lines = {
      tag: {line for m in heldout for form in aligned[m][tag] for line in form.split('\n')}
      for tag in tags
  }
  return texts, lines


def _aligned_messages(tags: Sequence[str]) -> dict[str, dict[str, tuple]]:
  """msgid -> language -> its forms, for msgids all of `tags` translate.

  A msgid in several catalogs takes each language's translation from the
  first catalog, in the corpus's (sorted path) order, that translates it.
  """
  # The corpus's own catalog discovery, so both agree on what each language
  # is.
  catalogs = corpus.django_catalogs()
  translations = {}  # language -> msgid -> forms
  for tag in tags:
    if tag == ENGLISH:
      continue
    found = translations.setdefault(tag, {})
    for path in catalogs.get(tag, ()):
      for msgid, forms in corpus.read_mo(path).items():
        # A msgctxt can make a translation say something else than its
        # msgid (context 'abbrev. month': 'July' -> 'Juli.'), so skip them.
        if '\x04' not in msgid and forms[0] and msgid not in found:
          found[msgid] = forms
  if translations:
    msgids = set.intersection(*(set(t) for t in translations.values()))
  else:
    # English alone: every msgid of every catalog, as the corpus has them.
    msgids = {
        msgid
        for paths in catalogs.values()
        for path in paths
        for msgid in corpus.read_mo(path)
        if '\x04' not in msgid
    }
  aligned = {}
  for msgid in msgids:
    entry = {tag: translations[tag][msgid] for tag in translations}
    if ENGLISH in tags:
      entry[ENGLISH] = tuple(msgid.split('\x00'))  # Singular and plural.
    aligned[msgid] = entry
  return aligned


# --- comparing tokenizers (notebooks/tokenizer.ipynb) -----------------------


def _label(key) -> str:
  """A legend label: an int key is a vocabulary size."""
  return f'{key:,} pieces' if isinstance(key, int) else str(key)


def comparison_languages(reports: Mapping[object, dict], order: str = 'parity') -> list[str]:
  """The languages all `reports` measured, in the order a comparison shows.

  Args:
    reports: label (e.g. the vocabulary size) -> a `fertility_report`.
    order: 'parity' or 'tokens_per_word' (ascending, in the first report;
      None last, ties by tag) or 'language' (by tag).

  Raises:
    ConfigError: no report, or an unknown `order`.
  """
  if not reports:
    raise ConfigError('No fertility report to compare.')
  if order not in ('parity', 'tokens_per_word', 'language'):
    raise ConfigError(f"order={order!r}: use 'parity', 'tokens_per_word' or 'language'.")
  first = next(iter(reports.values()))['languages']
  tags = [tag for tag in first if all(tag in r['languages'] for r in reports.values())]
  if order == 'language':
    return sorted(tags)

  def key(tag):
    value = first[tag][order]
    return (value is None, value or 0.0, tag)

  return sorted(tags, key=key)


def format_comparison(
    reports: Mapping[object, dict],
    order: str = 'parity',
    metrics: Sequence[str] = ('tokens_per_word', 'parity'),
) -> str:
  """`metrics` of each language under each report, as text.

  One row per language (see `comparison_languages` for the order); for each
  metric (a key of METRICS) one column per report, headed by its label.
  """
  tags = comparison_languages(reports, order)
  labels = [_label(k) for k in reports]
  width = max(11, *(len(label) for label in labels))
  first = next(iter(reports.values()))
  lines = [
      ', '.join(METRICS[m][0] for m in metrics) + f' (parity = {first["parity_meaning"]}).',
      f'{"":<10} ' + ' '.join(f'{METRICS[m][0]:>{width}}' for m in metrics for _ in labels),
      f'{"language":<10} ' + ' '.join(f'{label:>{width}}' for label in labels * len(metrics)),
  ]
  lines.append('-' * len(lines[-1]))
  for tag in tags:
    stats = [r['languages'][tag] for r in reports.values()]
    lines.append(
        f'{tag:<10} '
        + ' '.join(f'{format_metric(m, s[m]):>{width}}' for m in metrics for s in stats)
    )
  return '\n'.join(lines)


def figure_size(num_languages: int, num_metrics: int) -> tuple[float, float]:
  """Inches (width, height) of `plot_fertility`'s figure: room for every language's bars."""
  return (min(16.0, max(8.0, 2 + 0.35 * num_languages)), 1 + 3 * num_metrics)


def plot_fertility(
    reports: Mapping[object, dict],
    axes=None,
    order: str = 'parity',
    metrics: Sequence[str] = ('tokens_per_word', 'parity'),
):
  """Grouped bar charts of `metrics` (keys of METRICS), one panel each, one bar per report.

  Needs matplotlib (the `notebooks` extra), imported only here.

  Args:
    reports: label (e.g. the vocabulary size) -> a `fertility_report`; each
      gets one bar (one colour) per language in both panels.
    axes: one matplotlib Axes per metric; None makes a figure.
    order: the languages' order on the x axis (see `comparison_languages`).
    metrics: what each panel shows, top to bottom.

  Returns:
    The Axes. Bars are added report by report, language by language, so
    `axes[0].containers[i]` holds report i's bars in `comparison_languages`
    order; an undefined ratio (None) is a bar of height NaN (not drawn).
  """
  tags = comparison_languages(reports, order)
  if axes is None:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    _, axes = plt.subplots(
        len(metrics),
        1,
        figsize=figure_size(len(tags), len(metrics)),
        sharex=True,
        constrained_layout=True,
        squeeze=False,
    )
    axes = axes[:, 0]
  first = next(iter(reports.values()))
  width = 0.8 / len(reports)
  for ax, metric in zip(axes, metrics):
    ylabel = METRICS[metric][1].format(ref=first['reference'])
    for i, (key, report) in enumerate(reports.items()):
      heights = [report['languages'][t][metric] for t in tags]
      ax.bar(
          [x + (i - (len(reports) - 1) / 2) * width for x in range(len(tags))],
          [float('nan') if h is None else h for h in heights],
          width=width,
          label=_label(key),
      )
    ax.set_ylabel(ylabel)
    ax.grid(axis='y', alpha=0.3)
    if metric.startswith('parity'):
      ax.axhline(1.0, color='black', linewidth=0.8, linestyle='--')
  for ax in axes:
    ax.set_xticks(range(len(tags)))
    ax.set_xlim(-0.6, len(tags) - 0.4)
  axes[-1].set_xticklabels(tags, rotation=90)
  axes[0].legend()
  axes[0].set_title(
      'Tokenizer fertility per language'
      + (
          ' (parallel held-out text)'
          if first['parity_kind'] == PARALLEL
          else ' (parity per character: text not parallel)'
      )
  )
  return axes
