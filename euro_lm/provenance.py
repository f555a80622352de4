"""Where training content came from: one validated record per source, never guessed.

A source record is a dict with the fields of `FIELDS`; a field nobody stated is None, and
model cards and summaries show it as `UNKNOWN` for the provider to fill. `prepare_data`
stores the record of its inputs in the manifest, the embedded corpus has its own
(euro_lm.data.corpus.embedded_source), and an imported model keeps its base model's.
"""

import datetime
import json
import os
import re

from euro_lm.errors import ConfigError, read_json_object

# What a reader of a card or summary sees where the run cannot know the answer.
UNKNOWN = '[provider to complete]'
# The kinds of content a source holds (the AI Office template's types of content).
CONTENT_TYPES = ('web', 'books', 'code', 'curated', 'synthetic', 'conversations')
# How the provider obtained it: the source lists of the AI Office's public-summary template.
CATEGORIES = {
    'public_dataset': 'Publicly available datasets',
    'licensed': 'Private non-publicly available datasets obtained from third parties',
    'crawled': 'Data crawled and scraped from online sources',
    'user_data': 'User data',
    'synthetic': 'Synthetic data',
    'other': 'Other sources of data',
}
# In an imported model's workdir: what its HF folder said about itself (base_model_record).
BASE_MODEL_FILE = 'base_model.json'
# field -> what it holds (the prepare_data flag that sets it is --<field>).
FIELDS = {
    'source_name': 'a short name of the source, e.g. hplt-v2-fin',
    'description': 'what it is, in a sentence',
    'url': 'where it came from (http/https URL)',
    'license': 'its licence, an SPDX identifier or a short name (e.g. cc-by-4.0)',
    'collected': 'when it was collected: YYYY, YYYY-MM, YYYY-MM-DD or two of them FROM..TO',
    'content_type': f'one of {", ".join(CONTENT_TYPES)}',
    'category': f'how it was obtained: one of {", ".join(CATEGORIES)}',
    'filtering': 'the filtering and cleaning applied before euro_lm saw it',
}
_DATE = re.compile(r'\d{4}(-\d{2}(-\d{2})?)?$')
_LICENSE = re.compile(r'[A-Za-z0-9][A-Za-z0-9.+\-_ ]{0,63}$')
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9.+\-_/ ]{0,99}$')


def _check_date(text: str) -> bool:
  if not _DATE.match(text):
    return False
  parts = [int(p) for p in text.split('-')] + [1, 1]
  try:
    datetime.date(*parts[:3])
  except ValueError:
    return False
  return True


def _problem(field: str, value: str) -> str | None:
  """Why `value` is not valid for `field`, or None."""
  if value != value.strip() or not value or '\n' in value:
    return 'must be one non-empty line without surrounding spaces'
  if field == 'source_name' and not _NAME.match(value):
    return 'must be letters, digits, spaces and .+-_/ (at most 100)'
  if field == 'url' and not re.match(r'https?://\S+$', value):
    return 'must be an http:// or https:// URL'
  if field == 'license' and not _LICENSE.match(value):
    return 'must be an SPDX identifier or a short licence name (at most 64 characters)'
  if field == 'collected':
    ends = value.split('..')
    if len(ends) > 2 or not all(_check_date(end) for end in ends):
      return 'must be a date (YYYY, YYYY-MM or YYYY-MM-DD) or FROM..TO'
    if len(ends) == 2 and ends[0] > ends[1]:
      return 'ends before it starts'
  if field == 'content_type' and value not in CONTENT_TYPES:
    return f'must be one of {", ".join(CONTENT_TYPES)}'
  if field == 'category' and value not in CATEGORIES:
    return f'must be one of {", ".join(CATEGORIES)}'
  if len(value) > 2000:
    return 'is longer than 2000 characters'
  return None


def source_record(values: dict, where: str = '--') -> dict:
  """The validated record of `values` (field -> text; missing or empty: None).

  `where` prefixes the field in errors: '--' names the flag, 'FILE: ' a file's key.

  Raises:
    ConfigError: an unknown field or a bad value, naming both.
  """
  unknown = sorted(set(values) - set(FIELDS))
  if unknown:
    raise ConfigError(
        f'{where}{unknown[0]}: not a source field; the fields are {", ".join(FIELDS)}'
    )
  record = {}
  for field in FIELDS:
    value = values.get(field)
    if value in (None, ''):
      record[field] = None
      continue
    if not isinstance(value, str):
      raise ConfigError(f'{where}{field}={value!r}: must be text')
    problem = _problem(field, value)
    if problem:
      raise ConfigError(f'{where}{field}={value!r}: {problem}')
    record[field] = value
  if record['source_name'] is None and any(record.values()):
    raise ConfigError(f'{where}source_name: needed to describe a source (its other fields are set)')
  return record


def read_source_file(path: str) -> dict:
  """A source record from a JSON file of FIELDS (a sidecar describing an input).

  Raises:
    ConfigError: the file is unreadable, not a JSON object, or holds a bad field.
  """
  values = read_json_object(path, ConfigError, 'a JSON object of source fields')
  return source_record(values, where=f'{path}: ')


def is_described(record: dict | None) -> bool:
  """Whether anyone stated anything about the source."""
  return bool(record) and any(record.get(field) for field in FIELDS)


def undescribed(name: str, content_type: str | None = None) -> dict:
  """The record of a source nobody described: its name (and what euro_lm knows it holds)."""
  record = dict.fromkeys(FIELDS)
  record.update(source_name=name, content_type=content_type)
  return record


def base_model_record(hf_dir: str, hf_config: dict) -> dict:
  """What an HF folder says about itself: its name (the config's `_name_or_path`, else the
  folder's name), licence (the README's metadata, else the config's `license`) and the
  context it declares (`max_position_embeddings`, an export's default too), None where it
  says nothing."""
  name = hf_config.get('_name_or_path') or os.path.basename(os.path.normpath(hf_dir))
  license_ = card_metadata(os.path.join(hf_dir, 'README.md')).get('license')
  license_ = license_ or hf_config.get('license')
  text = hf_config.get('text_config')  # a multimodal model's language model
  positions = (text if isinstance(text, dict) else hf_config).get('max_position_embeddings')
  return {
      'name': str(name),
      'license': str(license_) if license_ else None,
      'path': os.path.abspath(hf_dir),
      'max_position_embeddings': positions if _is_int(positions) else None,
      'eos_token_id': _stop_ids(hf_dir, hf_config),
  }


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _stop_ids(hf_dir: str, hf_config: dict) -> list[int]:
  """The ids that end the folder's generations: generation_config.json's eos_token_id (an
  instruct model lists its end of turn there, Gemma 3's <end_of_turn>), else config.json's."""
  ids = None
  try:
    with open(os.path.join(hf_dir, 'generation_config.json'), encoding='utf-8') as f:
      generation = json.load(f)
    ids = generation.get('eos_token_id') if isinstance(generation, dict) else None
  except (OSError, ValueError):
    pass  # no generation config: the model config's says it
  if ids is None:
    ids = hf_config.get('eos_token_id')
  ids = ids if isinstance(ids, list) else [ids]
  return sorted({i for i in ids if _is_int(i)})


def card_metadata(path: str) -> dict:
  """The YAML metadata block at the top of a model card (README.md); {} if there is none or
  it does not parse (then nothing is known from it)."""
  try:
    with open(path, encoding='utf-8') as f:
      return split_front_matter(f.read(), path)[0]
  except (OSError, UnicodeDecodeError, ConfigError):
    return {}


def split_front_matter(text: str, path: str) -> tuple[dict, str]:
  """(metadata, body) of Markdown that may open with a `---` YAML block.

  Raises:
    ConfigError: the block is not a YAML mapping, naming `path`.
  """
  import yaml  # pylint: disable=import-outside-toplevel

  match = re.match(r'---\s*\n(.*?)\n---\s*(\n|$)', text, re.S)
  if not match:
    return {}, text
  try:
    front = yaml.safe_load(match.group(1)) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f'{path}: the metadata block is not valid YAML: {e}') from None
  if not isinstance(front, dict):
    raise ConfigError(f'{path}: the metadata block is not a YAML mapping')
  return front, text[match.end() :]
