"""The JSON files of a Hugging Face model folder: their names, reading and writing."""

import json
import os

from euro_lm.errors import HFError

CONFIG_FILE = 'config.json'
GENERATION_CONFIG_FILE = 'generation_config.json'


def read_config(hf_dir):
  """(the HF config dict, its path) of the folder `hf_dir`."""
  path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise HFError(f'no {CONFIG_FILE} in {hf_dir}')
  with open(path, encoding='utf-8') as f:
    return json.load(f), path


def write_json(path, obj):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write('\n')
