"""A run's tokenizer as Hugging Face tokenizer files, and its special token ids.

A `tokenizer.json` tokenizer (an imported model's) is copied file for file, so the export
carries exactly the tokenizer, special tokens and chat template it came with. A SentencePiece
model (one euro_lm trained) gets the files transformers' LlamaTokenizer reads.
"""

import json
import os
import shutil

from euro_lm.data.tokenizer import SENTENCEPIECE_MODEL, copy_files, load_tokenizer
from euro_lm.hf.folder import write_json

# euro_lm.data.tokenizer.train_sentencepiece's ids, for a checkpoint without a tokenizer.
DEFAULT_SPECIAL_IDS = (2, 3, 0)


def special_ids(tokenizer_path):
  """(bos, eos, pad) ids of the tokenizer at `tokenizer_path`, None for a token it lacks;
  DEFAULT_SPECIAL_IDS without one."""
  if not tokenizer_path:
    return DEFAULT_SPECIAL_IDS
  tokenizer = load_tokenizer(tokenizer_path)
  return tokenizer.bos_id, tokenizer.eos_id, (tokenizer.pad_id if tokenizer.pad_id >= 0 else None)


def write_tokenizer(tokenizer_path, output, log=print):
  """The tokenizer's files in the HF folder `output`."""
  tokenizer = load_tokenizer(tokenizer_path)
  if tokenizer.backend == 'tokenizers':
    copy_files(tokenizer, output)
    if not os.path.isfile(os.path.join(output, 'tokenizer_config.json')):
      write_json(
          os.path.join(output, 'tokenizer_config.json'),
          {'tokenizer_class': 'PreTrainedTokenizerFast'},
      )
  else:
    _write_sentencepiece(tokenizer.path, output, log)


def write_chat_template(output, template):
  """The template a run fine-tuned with, in `tokenizer_config.json` (where serving stacks
  read it) and `chat_template.jinja` (which transformers 5 prefers when present)."""
  path = os.path.join(output, 'tokenizer_config.json')
  config = {}
  if os.path.isfile(path):  # a SentencePiece tokenizer's folder may have none
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  config['chat_template'] = template
  write_json(path, config)
  with open(os.path.join(output, 'chat_template.jinja'), 'w', encoding='utf-8') as f:
    f.write(template)


def _write_sentencepiece(model_path, output, log):
  """tokenizer.model, tokenizer_config.json and special_tokens_map.json, plus the fast
  tokenizer.json when transformers is importable (converted offline from the .model)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel

  shutil.copyfile(model_path, os.path.join(output, SENTENCEPIECE_MODEL))
  sp = spm.SentencePieceProcessor(model_file=model_path)
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, 'rb') as f:
    proto.ParseFromString(f.read())
  piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
  special = {
      'bos_token': piece(sp.bos_id()),
      'eos_token': piece(sp.eos_id()),
      'unk_token': piece(sp.unk_id()),
      'pad_token': piece(sp.pad_id()),
  }
  special = {k: v for k, v in special.items() if v is not None}
  # euro_lm's tokenizers add no dummy prefix ('▁' before the text); HF must not either.
  add_prefix_space = bool(proto.normalizer_spec.add_dummy_prefix)
  tokenizer_config = {
      'tokenizer_class': 'LlamaTokenizer',
      'add_bos_token': True,
      'add_eos_token': False,
      'legacy': False,
      'add_prefix_space': add_prefix_space,
      'clean_up_tokenization_spaces': False,
      'model_max_length': 1_000_000_000,
      **special,
  }
  write_json(os.path.join(output, 'tokenizer_config.json'), tokenizer_config)
  try:
    from transformers import LlamaTokenizer  # pylint: disable=import-outside-toplevel
  except ImportError:
    log('transformers is not installed: wrote tokenizer.model without tokenizer.json')
  else:
    tokenizer = LlamaTokenizer.from_pretrained(output)
    tokenizer.save_pretrained(output)
    # save_pretrained rewrites tokenizer_config.json; keep ours, which names the fields.
    write_json(os.path.join(output, 'tokenizer_config.json'), tokenizer_config)
  write_json(os.path.join(output, 'special_tokens_map.json'), special)
