"""Export: a euro_lm checkpoint as a Hugging Face folder, streamed.

Each tensor is read from the Orbax checkpoint alone (through TensorStore; one layer at a
time, as euro_lm stores stacked leaves in per-layer chunks), converted, and written straight
into its planned place in a safetensors shard, so host memory stays near one tensor. It
needs neither torch nor transformers (transformers, if importable, adds the fast
tokenizer's tokenizer.json).
"""

import json
import os

import ml_dtypes
import numpy as np

from euro_lm.errors import HFError
from euro_lm.hf import architectures
from euro_lm.hf.folder import CONFIG_FILE, GENERATION_CONFIG_FILE, write_json
from euro_lm.hf.orbax_io import CheckpointLeaves
from euro_lm.hf.safetensors import ShardWriter
from euro_lm.hf.tokenizer import special_ids, write_chat_template, write_tokenizer
from euro_lm.model import lora

# --dtype -> the dtype of the exported weights.
DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}


def _load_run_config(step_dir, workdir):
  candidates = [
      os.path.join(str(step_dir), 'config', 'metadata'),
      os.path.join(workdir, CONFIG_FILE),
  ]
  for path in candidates:
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        config = json.load(f)
      if 'model' not in config:
        raise HFError(f'{path} has no "model" section')
      return config, path
  raise HFError(f'no euro_lm config for {step_dir}: looked for {" and ".join(candidates)}')


def _merged_layers(leaves, path, model):
  """(layer, weight) of a per-layer leaf, its LoRA adapters (if any) merged in: the
  export is the plain architecture, whose weights give the adapted model's logits."""
  layers = leaves.read_layers(path)
  if tuple(path[-2:]) not in {lora.TARGETS[t] for t in lora.targets(model)}:
    return layers
  adapter = (*path[:-1], path[-1] + lora.SUFFIX)
  scale = lora.scale(model)
  return (
      (i, np.asarray(lora.merge_weight(x, a, b, scale)))
      for (i, x), (_, a), (_, b) in zip(
          layers, leaves.read_layers((*adapter, 'a')), leaves.read_layers((*adapter, 'b'))
      )
  )


def declared_positions(seq_len, base_model):
  """The max_position_embeddings an export declares by default: the context trained on, or
  the imported base model's if longer (fine-tuning at a short seq_len does not shorten
  what the model's RoPE serves). lm-eval's hf model reads it as its max_length."""
  return max(seq_len, (base_model or {}).get('max_position_embeddings') or 0)


def export_hf(
    workdir,
    output,
    *,
    step=None,
    dtype='bfloat16',
    shard_bytes=2 * 2**30,
    max_position_embeddings=None,
    log=print,
    card_extra=None,
):
  """Writes the checkpoint of `workdir` (newest, or `step`) as an HF model folder of the
  architecture that `architectures.for_model` picks (Llama).

  It also writes the model card and the training-content summary from the checkpoint's
  records (euro_lm.card), merged with the provider's Markdown file `card_extra`.

  Returns the output directory.
  """
  if dtype not in DTYPES:
    raise HFError(f'--dtype={dtype!r} is not supported; use one of {", ".join(DTYPES)}')
  from euro_lm import card, records
  from euro_lm.checkpoint import find_tokenizer, resolve_checkpoint
  from euro_lm.data import chat
  from euro_lm.data.dataset import chat_template_of_run
  from euro_lm.data.tokenizer import load_tokenizer

  if card_extra:
    card.read_extra(card_extra)  # a bad file stops the export before it writes
  step_dir = resolve_checkpoint(workdir, step)
  config, config_path = _load_run_config(step_dir, workdir)
  model = config['model']
  arch = architectures.for_model(model)
  tokenizer_path = find_tokenizer(step_dir, workdir)
  bos, eos, pad = special_ids(tokenizer_path)
  report = records.report(str(step_dir))
  seq_len = (config.get('train') or {}).get('seq_len', 4096)
  hf = arch.hf_config(
      model,
      bos_token_id=bos,
      eos_token_id=eos,
      pad_token_id=pad,
      max_position_embeddings=max_position_embeddings
      or declared_positions(seq_len, report['base_model']),
      dtype=dtype,
  )

  os.makedirs(output, exist_ok=True)
  stale = sorted(f for f in os.listdir(output) if f.endswith('.safetensors'))
  if stale:  # transformers would load old shards beside the new index
    raise HFError(f'--output={output} already holds {stale[0]}; export into a new directory')
  shapes = arch.expected_hf_shapes(model)  # in writing order
  writer = ShardWriter(output, [(n, s, DTYPES[dtype]) for n, s in shapes.items()], shard_bytes)
  leaves = CheckpointLeaves(os.path.join(str(step_dir), 'state'))
  try:
    for path, template, per_layer in arch.param_table(model):
      for i, x in _merged_layers(leaves, path, model) if per_layer else [(None, leaves.read(path))]:
        name = template.format(i=i)
        x = arch.to_hf(path, x, model)
        if x.shape != shapes[name]:
          raise HFError(
              f'{step_dir}: params.{".".join(path)} gives {name} of shape '
              f'{x.shape}, but {config_path} implies {shapes[name]}'
          )
        writer.add(name, x.astype(DTYPES[dtype]))
    num_shards = writer.close()
  except BaseException:
    writer.abort()
    raise

  write_json(os.path.join(output, CONFIG_FILE), hf)
  # A fine-tuned chat model also stops where its template ends an assistant turn.
  template = chat_template_of_run(workdir) if tokenizer_path else None
  tokenizer = tokenizer_path and load_tokenizer(tokenizer_path)
  variables = chat.template_variables(
      (config.get('data') or {}).get('chat_template_kwargs', ''), 'data.chat_template_kwargs'
  )
  ids = chat.stop_ids(eos, tokenizer, template, report['base_model'], variables)
  stop = ids[0] if len(ids) == 1 else ids or None
  write_json(
      os.path.join(output, GENERATION_CONFIG_FILE),
      {'bos_token_id': bos, 'eos_token_id': stop, 'pad_token_id': pad, 'do_sample': False},
  )
  if tokenizer_path:
    write_tokenizer(tokenizer_path, output, log=log)
    if template is not None:
      write_chat_template(output, template)
  else:
    log(f'warning: no tokenizer in {step_dir} or {workdir}; exported no tokenizer')
  card.write_card(output, report, card_extra, None if template is None else variables)
  log(f'exported {step_dir} to {output}: {num_shards} shard(s), {dtype}')
  return output
