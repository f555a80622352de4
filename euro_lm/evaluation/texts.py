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
  """Documents per language tag, in file order, and each input file's bad records."""

  documents: dict[str, list[str]]
  files: list[str]
  bad_records: list[sources.BadRecords]


def read_held_out(patterns: Sequence[str], source: sources.TextSource) -> HeldOut:
  """The documents of every file the globs match, grouped by language."""
  files = sources.expand_globs(patterns)
  documents, reports = {}, []
  for path in files:
    docs, bad = source.read(path)
    for doc in docs:
      documents.setdefault(doc.language, []).append(doc.text)
    reports.append(bad)
  if not documents:
    raise DataError(f'no documents in {", ".join(files)}')
  return HeldOut(dict(sorted(documents.items())), files, reports)
