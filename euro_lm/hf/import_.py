"""Import: a local Hugging Face folder (safetensors) as a params-only euro_lm checkpoint,
streamed one leaf at a time, with the euro_lm config that trains from it."""

import os
import shutil

import numpy as np

from euro_lm import provenance
from euro_lm.data import chat
from euro_lm.data.tokenizer import copy_tokenizer, load_tokenizer, tokenizer_in
from euro_lm.errors import ConfigError, HFError
from euro_lm.hf import architectures
from euro_lm.hf.folder import CONFIG_FILE, read_config, write_json
from euro_lm.hf.orbax_io import save_params
from euro_lm.hf.safetensors import SafetensorsFolder
from euro_lm.hf.tokenizer import write_chat_template

# Embedding rows grown for new tokens are rounded up to this (any tensor degree divides it).
VOCAB_MULTIPLE = 128


def params_from_hf(folder, model, arch):
  """Yields `(euro_lm path, float32 numpy leaf)` one leaf at a time (layers stacked) from a
  SafetensorsFolder, after checking every name, and each shape against `model`; `arch` is
  the architecture module (see euro_lm.hf.architectures)."""
  shapes = arch.expected_hf_shapes(model)
  names = set(folder.names())
  unused = arch.unused_hf_tensors(names, model, folder.directory)
  if 'lm_head.weight' in unused:
    _check_tied_copy(folder)
  names -= unused
  unknown = sorted(names - set(shapes))
  if unknown:
    raise HFError(
        f'{folder.directory}: tensors euro_lm has no place for: '
        f'{", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""}'
    )

  def read(name, path):
    x = folder.get(name)
    if tuple(x.shape) != shapes[name]:
      raise HFError(
          f'{folder.directory}: {name} has shape {tuple(x.shape)}, but '
          f'{CONFIG_FILE} implies {shapes[name]}'
      )
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():
      raise HFError(f'{folder.directory}: {name} holds NaN or infinite values')
    return arch.from_hf(path, x, model)

  for path, template, per_layer in arch.param_table(model):
    if not per_layer:
      yield path, read(template.format(i=None), path)
      continue
    first = read(template.format(i=0), path)
    leaf = np.empty((model['num_layers'],) + first.shape, np.float32)  # filled, not stacked:
    leaf[0] = first  # one copy in memory
    for i in range(1, model['num_layers']):
      leaf[i] = read(template.format(i=i), path)
    yield path, leaf
    del leaf, first  # before the next leaf is allocated


def _check_tied_copy(folder):
  """Refuses a tied model's stored lm_head.weight unless it equals the embedding: which one
  runs depends on the transformers version (5 uses a distinct stored one, 4 ties)."""
  embedding = 'model.embed_tokens.weight'
  if not np.array_equal(folder.get('lm_head.weight'), folder.get(embedding)):
    raise HFError(
        f'{folder.directory}: {CONFIG_FILE} says tie_word_embeddings=true, but the folder '
        f'stores an lm_head.weight that differs from {embedding}; transformers 5 runs the '
        f'stored one, 4 ties them. Set tie_word_embeddings to false in its {CONFIG_FILE} to '
        'import the stored one'
    )


def import_hf(hf_dir, workdir, log=print, chat_template=''):
  """Writes `workdir/checkpoints/0/state` (a params-only Orbax checkpoint that
  `--config.train.init_from=workdir` reads), `workdir/config.json`,
  `workdir/hf_config.py`, `workdir/base_model.json` (the folder's name and licence, where
  it says them; see euro_lm.provenance.base_model_record) and, if the folder has one, the
  tokenizer's files in `workdir/tokenizer/` (tokenizer.json and its companions, else
  tokenizer.model; the config's data.add_bos follows what the tokenizer does by default).

  `chat_template` gives the imported tokenizer a chat template (replacing the folder's):
  'default' is euro_lm's (chat.DEFAULT_TEMPLATE), whose markers are added as single ids
  when the tokenizer lacks them, with embedding rows for them (see `_with_new_rows`); a
  path is a Jinja file, used as is.

  The checkpoint is written one leaf at a time, so host memory holds one leaf, not the
  model. Returns the euro_lm config (a ConfigDict).
  """
  from euro_lm.config import base_config  # pylint: disable=import-outside-toplevel

  hf, config_path = read_config(hf_dir)
  arch = architectures.for_hf_config(hf, config_path)
  model = arch.model_config_from_hf(hf, config_path)
  folder = SafetensorsFolder(hf_dir)
  folder.select(arch.text_tensor_names(folder.names(), hf, config_path, log))
  tokenizer = load_tokenizer(hf_dir) if tokenizer_in(hf_dir) else None
  if tokenizer is not None and tokenizer.vocab_size > model['vocab_size']:
    raise HFError(
        f'{tokenizer.files[0]} has ids up to {tokenizer.vocab_size - 1}, but {config_path} has '
        f'vocab_size={model["vocab_size"]} embedding rows'
    )
  template = _read_template(chat_template, tokenizer, hf_dir)
  added = chat.missing_tokens(tokenizer) if template == chat.DEFAULT_TEMPLATE else []

  workdir = os.path.abspath(workdir)
  step_dir = os.path.join(workdir, 'checkpoints', '0')
  if os.path.exists(step_dir):
    raise HFError(f'{step_dir} already exists; import into an empty workdir')
  os.makedirs(os.path.dirname(step_dir), exist_ok=True)
  leaves = params_from_hf(folder, model, arch)
  if added:  # add_chat_tokens gives them the ids after the last piece
    pieces = tokenizer.vocab_size
    rows = -(-(pieces + len(added)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    rows = max(model['vocab_size'], rows)
    leaves = _with_new_rows(leaves, pieces, rows)
    log(
        f'adding {", ".join(added)} to the tokenizer as ids {pieces}-'
        f'{pieces + len(added) - 1}; embedding rows {model["vocab_size"]} -> {rows}, the '
        "new ones the mean of the existing pieces' rows"
    )
    model = dict(model, vocab_size=rows)
  # Written aside and renamed when complete: a failed import leaves nothing in the way of a
  # retry (nor anything that looks like a checkpoint).
  partial = f'{step_dir}.importing-{os.getpid()}'
  try:
    save_params(partial, leaves)
    os.rename(partial, step_dir)
  finally:
    for leftover in (partial, f'{partial}.partial_save'):  # Orbax stages partial saves there
      shutil.rmtree(leftover, ignore_errors=True)
  state_dir = os.path.join(step_dir, 'state')

  config = base_config()
  config.model.update(model)
  config.train.init_from = workdir
  if tokenizer is not None:
    tokenizer_dir = os.path.join(workdir, 'tokenizer')
    if added:
      chat.add_chat_tokens(tokenizer, tokenizer_dir, added)
    else:
      copy_tokenizer(tokenizer, tokenizer_dir)
    if template is not None:
      write_chat_template(tokenizer_dir, template)
    config.data.tokenizer_path = tokenizer_dir
    config.data.add_bos = tokenizer.adds_bos
    config.data.add_eos = tokenizer.eos_id is not None
  else:
    log(
        f'warning: no tokenizer.json or tokenizer.model in {hf_dir}: training from it needs '
        'data.tokenizer_path set to the tokenizer its parameters were trained with (it '
        'refuses to train a new one)'
    )
  write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())
  write_json(
      os.path.join(workdir, provenance.BASE_MODEL_FILE), provenance.base_model_record(hf_dir, hf)
  )
  overrides = training_overrides(config, model)
  with open(os.path.join(workdir, 'hf_config.py'), 'w', encoding='utf-8') as f:
    f.write(
        f'"""euro_lm config for the HF model imported from {hf_dir}."""\n\n'
        'from euro_lm.config import base_config, check_variant\n\n\ndef get_config(arg=None):\n'
        '  check_variant(arg, (), __file__)\n  c = base_config()\n'
    )
    for key, value in overrides.items():
      f.write(f'  c.{key} = {value!r}\n')
    f.write('  return c\n')
  log(
      f'imported {hf_dir} into {state_dir}; continue training with\n  python -m euro_lm.train '
      f'--config={os.path.join(workdir, "hf_config.py")} --workdir=NEW_WORKDIR\nor\n'
      '  python -m euro_lm.train --config=configs/base.py --workdir=NEW_WORKDIR '
      + ' '.join(f'--config.{k}={v}' for k, v in overrides.items())
  )
  return config


def _read_template(name, tokenizer, hf_dir):
  """The template `import_hf(chat_template=name)` gives the tokenizer, or None ('')."""
  if not name:
    return None
  if tokenizer is None:
    raise HFError(f'--chat_template={name}: {hf_dir} has no tokenizer to give it to')
  try:
    return chat.template_named(name, tokenizer, '--chat_template')
  except ConfigError as e:
    raise HFError(str(e)) from None


def _with_new_rows(leaves, pieces, rows):
  """`leaves` with the embedding and output projection grown to `rows` token rows; the ids
  from `pieces` on (tokens just added, and the padding after them) get the mean of the
  first `pieces` rows, as transformers' resize_token_embeddings does: their logits
  start near the average instead of dominating or vanishing."""
  for path, leaf in leaves:
    if path in (('embedding',), ('output',)):
      axis = 0 if path == ('embedding',) else 1  # [V, D] and [D, V]
      leaf = np.moveaxis(leaf, axis, 0)
      grown = np.empty((rows,) + leaf.shape[1:], np.float32)
      grown[: leaf.shape[0]] = leaf
      grown[pieces:] = leaf[:pieces].mean(axis=0)
      leaf = np.moveaxis(grown, 0, axis)
    yield path, leaf


def training_overrides(config, model_fields):
  """{'model.x': value} for each of `model_fields` (the imported ones), plus init_from and
  the tokenizer with its document markers."""
  out = {f'model.{k}': config.model[k] for k in model_fields}
  out['train.init_from'] = config.train.init_from
  if config.data.tokenizer_path:
    out['data.tokenizer_path'] = config.data.tokenizer_path
    out['data.add_bos'] = config.data.add_bos
    out['data.add_eos'] = config.data.add_eos
  return out
