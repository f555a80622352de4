"""Tokenizers side by side on held-out text: `python -m euro_lm.evaluate_tokenizer`.

Each tokenizer (a SentencePiece `.model`, a Hugging Face `tokenizer.json` or a directory
with one, a tiktoken BPE file) gets a `fertility.fertility_report` on the same documents,
the report `train_tokenizer` writes too; the result holds one per tokenizer, with the
means over languages, and prints as one table and one plot for all of them.
"""

import os
from collections.abc import Callable, Sequence

from euro_lm.data.languages import resolve_language
from euro_lm.data.prepare import fertility, sources, token_counter
from euro_lm.errors import ConfigError, DataError
from euro_lm.evaluation.texts import read_held_out

# What the table and the plot show unless told otherwise.
DEFAULT_METRICS = (
    'tokens_per_word',
    'tokens_per_char',
    'parity',
    'parity_per_char',
    'byte_fallback_rate',
)


def tokenizer_labels(paths: Sequence[str], labels: Sequence[str] = ()) -> list[str]:
  """A column label per tokenizer: `labels` if given (one per path), else a name from
  the path: a file's directory for `tokenizer.json`/`tokenizer.model`, else the file or
  directory name; a repeated name gets `#2`, `#3`."""
  if labels:
    if len(labels) != len(paths) or len(set(labels)) != len(labels):
      raise ConfigError(
          f'--label: give one distinct label per --tokenizer ({len(paths)}), got {list(labels)}'
      )
    return list(labels)
  names = []
  for path in paths:
    path = os.path.normpath(path)
    name = os.path.basename(path)
    if name in ('tokenizer.json', 'tokenizer.model'):
      name = os.path.basename(os.path.dirname(os.path.abspath(path))) or name
    names.append(name)
  unique = []
  for i, name in enumerate(names):
    n = names[:i].count(name)
    unique.append(f'{name}#{n + 1}' if n else name)
  return unique


def evaluate_tokenizers(
    paths: Sequence[str],
    inputs: Sequence[str],
    source: sources.TextSource,
    *,
    labels: Sequence[str] = (),
    parallel: bool = False,
    pivot: str = '',
    tiktoken_pattern: str = 'cl100k_base',
    rare_max_count: int = 1,
    metrics: Sequence[str] = DEFAULT_METRICS,
    order: str = 'parity',
    output: str = '',
    plot: str = '',
    log: Callable[[str], None] = print,
) -> dict:
  """Measures every tokenizer on the documents of `inputs`; prints the table, writes the
  JSON result to `output` and the plot to `plot` (each if given) and returns the result.

  Args:
    paths: the tokenizers (see `token_counter.load_counter`).
    inputs: file globs, read by `source` as prepare_data reads them.
    labels: column labels, one per path; default from the paths.
    parallel: the documents are the same texts in every language, document i of each
      language a translation of document i of the others (refused if the counts differ).
    pivot: parity's reference language; default English, and with none read, no parity.
    tiktoken_pattern: the pre-tokenizer of tiktoken files: a name in
      `token_counter.TIKTOKEN_PATTERNS` or a regex.
    rare_max_count: see `fertility.fertility_report`.
    metrics, order: what the table and plot show (keys of `fertility.METRICS`), and the
      languages' order (see `fertility.comparison_languages`).

  Raises:
    UserError: a bad flag (named), a missing or unreadable tokenizer or input file, no
      documents, documents that are not parallel with `parallel`, or matplotlib missing
      for `plot`.
  """
  if not paths:
    raise ConfigError('--tokenizer: give at least one tokenizer.')
  if unknown := [m for m in metrics if m not in fertility.METRICS]:
    raise ConfigError(f'--metrics: unknown {unknown}; use some of {list(fertility.METRICS)}')
  if rare_max_count < 0:
    raise ConfigError(f'--rare_max_count must be >= 0, got {rare_max_count}.')
  reference = fertility.ENGLISH
  if pivot:
    try:
      reference = resolve_language(pivot)
    except ValueError as e:
      raise ConfigError(f'--pivot={pivot}: {e}') from None
  names = tokenizer_labels(paths, labels)
  counters = {}
  for name, path in zip(names, paths):
    counters[name] = token_counter.load_counter(path, tiktoken_pattern)
  held_out = read_held_out(inputs, source)
  documents = held_out.documents
  for warning in held_out.warnings:
    log(f'warning: {warning}')
  if pivot and reference not in documents:
    raise DataError(
        f'--pivot={pivot}: no {reference} documents in the input ({", ".join(documents)})'
    )
  if parallel and len({len(d) for d in documents.values()}) > 1:
    counts = ', '.join(f'{tag}: {len(d)}' for tag, d in documents.items())
    raise DataError(
        '--parallel: parallel text has the same number of documents in every language;'
        f' got {counts}'
    )
  reports = {}
  for name, counter in counters.items():
    log(f'{name}: {counter.kind}, {counter.vocab_size:,} ids, {counter.path}')
    report = fertility.fertility_report(
        counter,
        documents,
        parallel=parallel,
        reference=reference,
        rare_max_count=rare_max_count,
    )
    report['mean'] = _means(report['languages'])
    reports[name] = report
  result = {
      'inputs': held_out.files,
      'parallel': parallel,
      'pivot': reference if reference in documents else None,
      'parity_kind': next(iter(reports.values()))['parity_kind'],
      'rare_max_count': rare_max_count,
      'documents': {tag: len(d) for tag, d in documents.items()},
      'tokenizers': reports,
      **held_out.report_json(),
  }
  log(format_summary(result))
  if result['pivot'] is None:
    log(f'no parity: no {reference} documents in the input; --pivot names another language')
  log(fertility.format_comparison(reports, order, metrics))
  if output:
    fertility.write_report(result, output)
    log(f'wrote {output}')
  if plot:
    save_plot(reports, plot, order, metrics)
    log(f'wrote {plot}')
  return result


def _means(stats: dict) -> dict:
  """The mean over languages of each ratio (languages where it is defined)."""
  means = {}
  for metric in fertility.METRICS:
    values = [s[metric] for s in stats.values() if s.get(metric) is not None]
    means[metric] = sum(values) / len(values) if values else None
  return means


def format_summary(result: dict) -> str:
  """One line per tokenizer: kind, size, share of the vocabulary used, mean ratios."""
  lines = [
      f'{"tokenizer":<20} {"kind":<13} {"ids":>9} {"vocab used":>10}'
      f' {"tokens/word":>11} {"tokens/char":>11} {"byte fb":>8}  (means over languages)'
  ]
  for name, report in result['tokenizers'].items():
    mean = report['mean']
    lines.append(
        f'{name:<20} {report["tokenizer"]["kind"]:<13} {report["vocab_size"]:>9,}'
        f' {fertility.format_metric("vocab_used_rate", report["vocab_used"]):>10}'
        f' {fertility.format_metric("tokens_per_word", mean["tokens_per_word"]):>11}'
        f' {fertility.format_metric("tokens_per_char", mean["tokens_per_char"]):>11}'
        f' {fertility.format_metric("byte_fallback_rate", mean["byte_fallback_rate"]):>8}'
    )
  return '\n'.join(lines)


def save_plot(reports: dict, path: str, order: str, metrics: Sequence[str]) -> None:
  """`fertility.plot_fertility` of the reports, saved to `path` (format from its name)."""
  try:
    # A bare Figure: no pyplot state, no GUI backend, nothing left open.
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(
        f"--plot needs matplotlib ({e}): pip install matplotlib (or 'euro_lm[notebooks]')"
    ) from e
  tags = fertility.comparison_languages(reports, order)
  figure = Figure(
      figsize=fertility.figure_size(len(tags), len(metrics)),
      constrained_layout=True,
  )
  axes = figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
  fertility.plot_fertility(reports, axes=axes, order=order, metrics=metrics)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=120)
