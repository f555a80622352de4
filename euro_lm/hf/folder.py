"""The JSON files of a Hugging Face model folder: their names, reading and writing, and
config fields read with their types checked."""

import json
import math
import os

from euro_lm.errors import HFError

CONFIG_FILE = 'config.json'
GENERATION_CONFIG_FILE = 'generation_config.json'


def read_config(hf_dir):
  """(the HF config dict, its path) of the folder `hf_dir`."""
  path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise HFError(f'no {CONFIG_FILE} in {hf_dir}')
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise HFError(f'{path} is not readable JSON: {e}') from None
  if not isinstance(config, dict):
    raise HFError(f'{path} holds a JSON {type(config).__name__}, not an object')
  return config, path


def write_json(path, obj):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write('\n')


def positive_int(config, field, where, *, nullable=False):
  """`config[field]` as a positive integer; with `nullable`, None where it is null or
  absent (a value the reader derives)."""
  value = config.get(field)
  if value is None:
    if nullable:
      return None
    if field not in config:
      raise HFError(f'{where}: required field {field!r} is missing')
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise HFError(f'{where}: {field}={value!r} must be a positive integer')
  return value


def positive_float(config, field, where, *, nullable=False):
  """`config[field]` (an integer or a float) as a positive, finite float; with `nullable`,
  None where it is null or absent."""
  value = config.get(field)
  if value is None:
    if nullable:
      return None
    if field not in config:
      raise HFError(f'{where}: required field {field!r} is missing')
  if (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or not math.isfinite(value)
      or value <= 0
  ):
    raise HFError(f'{where}: {field}={value!r} must be a positive number')
  return float(value)


def boolean(config, field, where):
  """`config[field]`, which must be true or false (a string "false" is not)."""
  value = config.get(field)
  if not isinstance(value, bool):
    raise HFError(f'{where}: {field}={value!r} must be true or false')
  return value
