"""The embedded corpus, train/validation splits and language selection.

The embedded corpus is real text in ~30 European languages that ships with
every euro_lm install: the translation catalogs of Django's own package. It is
small (a few hundred KB per language), enough for demos and tests, not for
training a useful model.
"""

import glob
import os
import struct

from euro_lm import provenance
from euro_lm.data import languages
from euro_lm.errors import ConfigError, DataError, UserError

_MO_MAGIC = 0x950412DE
# msgfmt joins a context to its msgid with EOT, and plural forms with NUL.
_CONTEXT_SEPARATOR = '\x04'
_PLURAL_SEPARATOR = '\x00'


# The languages of the embedded corpus. Django translates into more of the language
# table (Russian, Welsh, Armenian, ...), but several of those catalogs are nearly empty,
# and the parallel held-out set needs messages that every language translates.
# fmt: off
EMBEDDED_LANGUAGES = (
    'bos_Latn', 'bul_Cyrl', 'cat_Latn', 'ces_Latn', 'dan_Latn', 'deu_Latn', 'ell_Grek',
    'eng_Latn', 'est_Latn', 'eus_Latn', 'fin_Latn', 'fra_Latn', 'gle_Latn', 'glg_Latn',
    'hrv_Latn', 'hun_Latn', 'isl_Latn', 'ita_Latn', 'kat_Geor', 'lav_Latn', 'lit_Latn',
    'mkd_Cyrl', 'nld_Latn', 'nno_Latn', 'nob_Latn', 'pol_Latn', 'por_Latn', 'ron_Latn',
    'slk_Latn', 'slv_Latn', 'spa_Latn', 'sqi_Latn', 'srp_Cyrl', 'swe_Latn', 'tur_Latn',
    'ukr_Cyrl',
)
# fmt: on


class CorpusNotInstalledError(UserError, RuntimeError):
  """The package holding a corpus is not installed."""


def read_mo(path: str) -> dict[str, tuple[str, ...]]:
  """Reads a compiled GNU gettext catalog (.mo).

  Args:
    path: the .mo file.

  Returns:
    msgid -> translations, both as stored: a msgid keeps its context prefix
    (`context\\x04msgid`) and plural (`singular\\x00plural`); a message has one
    translation per plural form. The header entry (empty msgid) is left out.

  Raises:
    ValueError: the file is not a valid UTF-8 .mo catalog; names the path.
  """
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return _parse_mo(data)
  except (struct.error, UnicodeDecodeError, ValueError) as e:
    raise DataError(f'{path}: not a valid UTF-8 .mo catalog: {e}') from e


def _parse_mo(data: bytes) -> dict[str, tuple[str, ...]]:
  for byte_order in '<>':
    if struct.unpack_from(byte_order + 'I', data)[0] == _MO_MAGIC:
      break
  else:
    raise ValueError('bad magic number')
  revision, count, originals_at, translations_at = struct.unpack_from(byte_order + '4I', data, 4)
  if revision >> 16 not in (0, 1):
    raise ValueError(f'unsupported major revision {revision >> 16}')

  def string_at(table_offset, index):
    length, offset = struct.unpack_from(byte_order + '2I', data, table_offset + 8 * index)
    if offset + length > len(data):
      raise ValueError(f'string {index} runs past the end of the file')
    return data[offset : offset + length].decode('utf-8')

  messages = {}
  for i in range(count):
    msgid = string_at(originals_at, i)
    if msgid:
      translation = string_at(translations_at, i)
      messages[msgid] = tuple(translation.split(_PLURAL_SEPARATOR))
  return messages


def django_catalogs() -> dict[str, list[str]]:
  """Language tag -> Django's .mo catalogs for it, in sorted path order."""
  try:
    import django  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CorpusNotInstalledError(
        "The embedded corpus is read from Django's translation catalogs, and"
        ' Django is not installed: `pip install django` (or installing'
        ' euro_lm with its dependencies) adds it.'
    ) from e
  root = os.path.dirname(django.__file__)
  paths = glob.glob(os.path.join(root, 'conf', 'locale', '*', 'LC_MESSAGES', '*.mo'))
  paths += glob.glob(os.path.join(root, 'contrib', '*', 'locale', '*', 'LC_MESSAGES', '*.mo'))
  catalogs = {}
  for path in sorted(paths):
    locale = path.split(os.sep)[-3]
    # Base locales only: regional variants (pt_BR, de_CH) repeat the base
    # language, and sr_Latn repeats sr's messages in the Latin script.
    if '_' in locale:
      continue
    try:
      tag = languages.canonical_language(locale)
    except ValueError:
      continue  # A language outside the table (ja, zh, ...).
    if tag in EMBEDDED_LANGUAGES:
      catalogs.setdefault(tag, []).append(path)
  return catalogs


def _message_texts(catalog: dict[str, tuple[str, ...]], source: bool):
  """Yields a catalog's texts: its msgids (source) or its translations."""
  for msgid in sorted(catalog):
    if source:
      forms = msgid.split(_CONTEXT_SEPARATOR)[-1].split(_PLURAL_SEPARATOR)
    else:
      forms = catalog[msgid]
    yield from (form for form in forms if form)


def _group(texts, doc_chars: int) -> list[str]:
  """Joins consecutive texts with newlines into documents of ~doc_chars."""
  documents, current, current_chars = [], [], 0
  for text in texts:
    current.append(text)
    current_chars += len(text) + 1
    if current_chars >= doc_chars:
      documents.append('\n'.join(current))
      current, current_chars = [], 0
  if current:
    documents.append('\n'.join(current))
  return documents


def load_embedded_corpus(doc_chars: int = 2000) -> dict[str, list[str]]:
  """Loads the embedded corpus: language tag -> documents, sorted by tag.

  Each language's messages, catalog by catalog in sorted path order and
  sorted by msgid within a catalog, are joined with newlines into documents
  of about `doc_chars` characters. Other languages use the translations (all
  plural forms); English, which Django does not translate, uses the source
  strings of all those catalogs, each once.

  Raises:
    CorpusNotInstalledError: Django is not importable.
  """
  paths_by_tag = django_catalogs()
  catalogs = {path: read_mo(path) for paths in paths_by_tag.values() for path in paths}
  english = languages.canonical_language('en')
  texts_by_tag = {
      tag: [t for p in paths for t in _message_texts(catalogs[p], source=False)]
      for tag, paths in paths_by_tag.items()
      if tag != english
  }
  english_texts = (t for p in sorted(catalogs) for t in _message_texts(catalogs[p], source=True))
  texts_by_tag[english] = list(dict.fromkeys(english_texts))
  return {tag: _group(texts_by_tag[tag], doc_chars) for tag in sorted(texts_by_tag)}


def embedded_source() -> dict:
  """The provenance record of the embedded corpus (see euro_lm.provenance)."""
  import django  # pylint: disable=g-import-not-at-top

  return provenance.source_record(
      {
          'source_name': f'django-{django.__version__}-catalogs',
          'description': (
              f"The translation catalogs (.mo) shipped in Django {django.__version__}'s "
              "package: its user-interface messages as Django's translators wrote them"
          ),
          'url': 'https://github.com/django/django',
          'license': 'BSD-3-Clause',
          'content_type': 'curated',
          'category': 'other',
          'filtering': (
              'base locales only (regional variants left out); the translations (English: '
              'the source strings, each once) joined with newlines into documents of about '
              '2,000 characters'
          ),
      }
  )


def holdout_every(valid_fraction: float) -> int:
  """k such that every k-th document is held out for validation."""
  if not 0 < valid_fraction <= 0.5:
    raise ConfigError(f'data.valid_fraction must be in (0, 0.5], got {valid_fraction}.')
  return round(1 / valid_fraction)


def split_train_valid(
    docs_by_lang: dict[str, list[str]], valid_fraction: float
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """Holds out every k-th document per language, k = round(1/valid_fraction).

  Deterministic. Each language keeps at least one training and one
  validation document, so it needs at least two documents.

  Raises:
    ValueError: valid_fraction outside (0, 0.5], or a language with fewer
      than two documents.
  """
  holdout_every(valid_fraction)
  train, valid = {}, {}
  for tag, docs in docs_by_lang.items():
    held_out = set(held_out_indices(len(docs), valid_fraction, tag))
    train[tag] = [d for i, d in enumerate(docs) if i not in held_out]
    valid[tag] = [d for i, d in enumerate(docs) if i in held_out]
  return train, valid


def held_out_indices(count: int, valid_fraction: float, name: str) -> range:
  """The documents `split_train_valid` holds out of `count` (those of `name`).

  Raises:
    ConfigError: valid_fraction outside (0, 0.5], or fewer than two documents.
  """
  every = holdout_every(valid_fraction)
  if count < 2:
    raise ConfigError(
        f'Language {name} has {count} document(s); a train/validation split needs at least 2.'
    )
  # Offsetting by k-1 holds out documents k-1, 2k-1, ...; a language shorter
  # than k still gets its last document held out.
  return range(every - 1, count, every) or range(count - 1, count)


def select_languages(docs_by_lang: dict[str, list[str]], spec: str) -> dict[str, list[str]]:
  """Keeps the languages in `spec` (comma-separated codes; '' keeps all).

  Raises:
    ValueError: a code is unknown, or its language is not in the corpus.
  """
  if not spec.strip():
    return dict(docs_by_lang)
  selected = {}
  for code in spec.split(','):
    try:
      tag = languages.canonical_language(code)
    except ValueError as e:
      raise ConfigError(f'data.languages: {e}') from e
    if tag not in docs_by_lang:
      raise ConfigError(
          f'data.languages asks for {code.strip()!r} ({tag}), which the corpus'
          f' does not have. Available: {", ".join(sorted(docs_by_lang))}.'
      )
    selected[tag] = docs_by_lang[tag]
  return {tag: selected[tag] for tag in sorted(selected)}
