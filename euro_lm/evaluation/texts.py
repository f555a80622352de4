"""Held-out text: the documents of JSONL/Parquet files by language, as prepare_data reads them.

Both `python -m euro_lm.evaluate` (a checkpoint) and `python -m euro_lm.evaluate_tokenizer`
read their input with `read_held_out`; it needs neither JAX nor a model.
"""

import dataclasses
from collections.abc import Sequence

from euro_lm.data.prepare import sources
from euro_lm.errors import DataError


@dataclasses.dataclass
class HeldOut:
  """Documents per language tag, in file order, each input file's bad records, and what a
  user must hear about the inputs (`warning:` lines without the prefix)."""

  documents: dict[str, list[str]]
  files: list[str]
  bad_records: list[sources.BadRecords]
  warnings: list[str]

  def report_json(self) -> dict:
    """The bad records and truncations by file, for a result file."""
    return {
        'bad_records': {r.path: r.to_json() for r in self.bad_records if r.total},
        'truncated': {r.path: r.truncation_json() for r in self.bad_records if r.truncated},
    }


def read_held_out(patterns: Sequence[str], source: sources.TextSource) -> HeldOut:
  """The documents of every file the globs match, grouped by language.

  A file's bad records, a file cut short and a file without documents are warnings (errors
  when the source is strict): a score is never of less text than the user gave unsaid.
  """
  files = sources.expand_globs(patterns)
  documents, reports, warnings = {}, [], []
  for path in files:
    docs, bad = source.read(path)
    count = 0
    for doc in docs:
      documents.setdefault(doc.language, []).append(doc.text)
      count += 1
    reports.append(bad)
    if bad.total:
      warnings.append(f'skipped bad records: {bad}')
    warning = bad.warning(count)
    if warning:
      warnings.append(warning)
  if not documents:
    raise DataError(f'no documents in {", ".join(files)}')
  return HeldOut(dict(sorted(documents.items())), files, reports, warnings)
