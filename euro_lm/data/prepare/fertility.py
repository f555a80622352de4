"""Tokenizer fertility: what each language pays in tokens for the same text.

A tokenizer that needs twice the tokens for Greek as for English makes Greek
text twice as expensive to train on and leaves it half the context. The
report measures, per language, tokens per whitespace word, UTF-8 bytes and
characters per token, and parity against English (Petrov et al., 2023,
"Language Model Tokenizers Introduce Unfairness Between Languages").

Parity compares token counts, which only means something on parallel text:
the same content in every language. The embedded corpus is parallel (Django's
catalogs translate the same messages), and `embedded_parallel_heldout` aligns
it by message. For other text the report falls back to tokens per byte
relative to English, and says which of the two it is.

`format_comparison` and `plot_fertility` (matplotlib, imported lazily) put several
reports side by side, e.g. one per vocabulary size (notebooks/tokenizer.ipynb).
"""

import json
import os
import tempfile
from collections.abc import Mapping, Sequence

from euro_lm.data import corpus, languages
from euro_lm.errors import ConfigError

ENGLISH = languages.canonical_language('en')

# The two meanings of `parity`, as the report labels them.
PARALLEL = 'parallel'
PER_BYTE = 'per_byte'
_PARITY_MEANING = {
    PARALLEL: 'tokens / tokens of the same text in {ref} (parallel text)',
    PER_BYTE: '(tokens per byte) / ({ref} tokens per byte) (text not parallel)',
}


def fertility_report(
    tokenizer,
    texts_by_language: Mapping[str, Sequence[str]],
    *,
    parallel: bool = False,
    reference: str = ENGLISH,
) -> dict:
  """Measures how `tokenizer` splits each language's texts.

  Counts are totals over a language's texts, and each ratio is a ratio of
  totals, so long texts weigh more than short ones (as they do in training).

  Args:
    tokenizer: a euro_lm Tokenizer (anything with `encode_batch`).
    texts_by_language: language tag -> texts. Encoded without bos/eos.
    parallel: the texts are translations of each other, text i of every
      language saying the same thing; parity is then a ratio of token counts.
      Otherwise it is a ratio of tokens per byte.
    reference: the language parity is relative to; without it in
      `texts_by_language`, parity is None.

  Returns:
    A JSON-serializable dict: `parity_kind` (PARALLEL or PER_BYTE),
    `parity_meaning`, `reference`, `vocab_size`, and `languages`: tag ->
    texts, words, characters, bytes, tokens, tokens_per_word,
    bytes_per_token, chars_per_token, parity. A ratio whose denominator is 0
    is None.

  Raises:
    ConfigError: `parallel` texts whose languages have different text counts.
  """
  if parallel and len({len(t) for t in texts_by_language.values()}) > 1:
    counts = {tag: len(t) for tag, t in texts_by_language.items()}
    raise ConfigError(f'Parallel texts need the same number of texts per language: {counts}.')
  stats = {}
  for tag, texts in texts_by_language.items():
    texts = list(texts)
    tokens = sum(map(len, tokenizer.encode_batch(texts)))
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
        'bytes_per_token': _ratio(num_bytes, tokens),
        'chars_per_token': _ratio(chars, tokens),
    }
  ref = stats.get(reference)
  for s in stats.values():
    if ref is None:
      s['parity'] = None
    elif parallel:
      s['parity'] = _ratio(s['tokens'], ref['tokens'])
    else:
      # (tokens / bytes) / (ref tokens / ref bytes), in integers until the
      # one division, so the reference's own parity is exactly 1.0.
      s['parity'] = _ratio(s['tokens'] * ref['bytes'], s['bytes'] * ref['tokens'])
  kind = PARALLEL if parallel else PER_BYTE
  return {
      'parity_kind': kind,
      'parity_meaning': _PARITY_MEANING[kind].format(ref=reference),
      'reference': reference,
      'vocab_size': tokenizer.vocab_size,
      'languages': stats,
  }


def _ratio(numerator, denominator):
  return numerator / denominator if denominator else None


def format_table(report: dict) -> str:
  """The report as a console table, lowest parity first (None last)."""

  def order(item):
    tag, s = item
    return (s['parity'] is None, s['parity'] or 0.0, tag)

  def number(x, digits=2):
    return '-' if x is None else f'{x:.{digits}f}'

  header = (
      f'{"language":<10} {"tokens/word":>11} {"bytes/token":>11}'
      f' {"chars/token":>11} {"parity":>7} {"tokens":>9} {"words":>8}'
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
        f'{tag:<10} {number(s["tokens_per_word"]):>11}'
        f' {number(s["bytes_per_token"]):>11}'
        f' {number(s["chars_per_token"]):>11} {number(s["parity"], 3):>7}'
        f' {s["tokens"]:>9,} {s["words"]:>8,}'
    )
  return '\n'.join(lines)


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


def format_comparison(reports: Mapping[object, dict], order: str = 'parity') -> str:
  """Tokens per word and parity of each language under each report, as text.

  One row per language (see `comparison_languages` for the order), one
  tokens/word and one parity column per report, headed by its label.
  """
  tags = comparison_languages(reports, order)
  labels = [_label(k) for k in reports]
  width = max(11, *(len(label) for label in labels))

  def number(x, digits):
    return '-' if x is None else f'{x:.{digits}f}'

  first = next(iter(reports.values()))
  lines = [
      f'Tokens per word and parity ({first["parity_meaning"]}).',
      f'{"":<10} '
      + ' '.join(f'{"tokens/word":>{width}}' for _ in labels)
      + ' '
      + ' '.join(f'{"parity":>{width}}' for _ in labels),
      f'{"language":<10} ' + ' '.join(f'{label:>{width}}' for label in labels * 2),
  ]
  lines.append('-' * len(lines[-1]))
  for tag in tags:
    stats = [r['languages'][tag] for r in reports.values()]
    lines.append(
        f'{tag:<10} '
        + ' '.join(f'{number(s["tokens_per_word"], 2):>{width}}' for s in stats)
        + ' '
        + ' '.join(f'{number(s["parity"], 3):>{width}}' for s in stats)
    )
  return '\n'.join(lines)


def plot_fertility(reports: Mapping[object, dict], axes=None, order: str = 'parity'):
  """Grouped bar charts of tokens per word and parity, one bar per report.

  Needs matplotlib (the `notebooks` extra), imported only here.

  Args:
    reports: label (e.g. the vocabulary size) -> a `fertility_report`; each
      gets one bar (one colour) per language in both panels.
    axes: two matplotlib Axes (tokens per word, parity); None makes a figure.
    order: the languages' order on the x axis (see `comparison_languages`).

  Returns:
    The two Axes. Bars are added report by report, language by language, so
    `axes[0].containers[i]` holds report i's bars in `comparison_languages`
    order; an undefined ratio (None) is a bar of height NaN (not drawn).
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  tags = comparison_languages(reports, order)
  if axes is None:
    _, axes = plt.subplots(
        2,
        1,
        figsize=(min(16.0, max(8.0, 2 + 0.35 * len(tags))), 7),
        sharex=True,
        constrained_layout=True,
    )
  first = next(iter(reports.values()))
  width = 0.8 / len(reports)
  panels = (
      ('tokens_per_word', 'tokens per word (fertility)'),
      ('parity', f'parity vs {first["reference"]}'),
  )
  for ax, (metric, ylabel) in zip(axes, panels):
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
  axes[1].axhline(1.0, color='black', linewidth=0.8, linestyle='--')
  for ax in axes:
    ax.set_xticks(range(len(tags)))
    ax.set_xlim(-0.6, len(tags) - 0.4)
  axes[1].set_xticklabels(tags, rotation=90)
  axes[0].legend()
  axes[0].set_title(
      'Tokenizer fertility per language'
      + (
          ' (parallel held-out text)'
          if first['parity_kind'] == PARALLEL
          else ' (parity per byte: text not parallel)'
      )
  )
  return axes
