"""LoRA: low-rank adapters on chosen projections (`model.lora_rank` > 0).

A targeted weight W (`[in..., out...]`, e.g. wq `[D, H, d]`) gets A `[in..., r]` and B
`[r, out...]`, with W's logical axes on their W sides and the rank unsharded, so they shard
like W. B starts at zero, so a fresh adapter leaves the model unchanged, and the projection
becomes `x W + (alpha / r) (x A) B`. Each adapter is a submodule beside its weight
(`wq_lora/{a, b}`): the base parameters keep their names and their init, `split` parts a
params tree into base and adapters (a pytree of its own, to train and store alone), `join`
puts them back, and `merge` folds the adapters into the base weights for export.
"""

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from euro_lm.model.attention import head_dim

# model.lora_targets names -> (module, weight) in each decoder block.
TARGETS = {
    'q': ('attention', 'wq'),
    'k': ('attention', 'wk'),
    'v': ('attention', 'wv'),
    'o': ('attention', 'wo'),
    'gate': ('mlp', 'w_gate'),
    'up': ('mlp', 'w_up'),
    'down': ('mlp', 'w_down'),
}
SUFFIX = '_lora'  # an adapter's submodule: the weight's name plus this


def targets(model_config):
  """The targeted projections (`TARGETS` keys), empty when LoRA is off; `gate` only where
  the MLP has one (not with xIELU), so the default targets suit every model."""
  if not model_config.get('lora_rank', 0):
    return ()
  named = (t.strip() for t in model_config['lora_targets'].split(','))
  return tuple(t for t in named if t and (t != 'gate' or has_gate(model_config)))


def has_gate(model_config):
  """Whether the block's MLP has a gate projection: with every activation but xIELU
  (Apertus, whose MLP is down(xielu(up(x))))."""
  return model_config.get('mlp_activation', 'silu') != 'xielu'


def widths(model_config):
  """`{target: (fan_in, fan_out)}` of every projection LoRA can target."""
  c = model_config
  q, kv, d, f = (
      c['num_heads'] * head_dim(c),
      c['num_kv_heads'] * head_dim(c),
      c['embed_dim'],
      c['mlp_dim'],
  )
  return {
      'q': (d, q),
      'k': (d, kv),
      'v': (d, kv),
      'o': (q, d),
      'gate': (d, f),
      'up': (d, f),
      'down': (f, d),
  }


def adapter_count(model_config):
  """Adapter parameters over all layers (0 when LoRA is off)."""
  w = widths(model_config)
  per_layer = sum(sum(w[t]) for t in targets(model_config)) * model_config.get('lora_rank', 0)
  return model_config['num_layers'] * per_layer


def scale(model_config):
  """alpha / r, what the adapters' product is multiplied by."""
  return model_config['lora_alpha'] / model_config['lora_rank']


def without_lora(model_config):
  """A copy of the `model` config with LoRA off: the architecture of merged params."""
  config = model_config.copy_and_resolve_references()
  config.lora_rank = 0
  return config


def _is_adapter(key):
  return str(key).endswith(SUFFIX)


def split(params):
  """`(base, adapters)`: two nested dicts that together hold every leaf of `params` (boxed
  or not); `adapters` is `{}` without LoRA."""
  base, adapters = {}, {}
  for key, value in params.items():
    if _is_adapter(key):
      adapters[key] = value
    elif isinstance(value, Mapping):
      sub_base, sub_adapters = split(value)
      base[key] = sub_base
      if sub_adapters:
        adapters[key] = sub_adapters
    else:
      base[key] = value
  return base, adapters


def join(base, adapters):
  """The params tree of `base` with `adapters` put back in (the inverse of `split`)."""
  if not base:
    return adapters
  joined = dict(base)
  for key, value in adapters.items():
    nested = isinstance(value, Mapping) and not _is_adapter(key)
    joined[key] = join(joined.get(key, {}), value) if nested else value
  return joined


def trainable(params):
  """`(trainable, frozen)`: with adapters, the adapters and the base; else all params and
  `{}`. `join(frozen, trainable)` is `params` either way."""
  base, adapters = split(params)
  return (adapters, base) if adapters else (params, {})


def merge_weight(w, a, b, lora_scale):
  """W + scale * A @ B in W's layout and dtype, for one weight or a layer-stacked one (a
  leading axis on all three), in float32 at full precision."""
  lead = a.ndim + b.ndim - 2 - w.ndim  # leading (stacked layer) axes
  rank = b.shape[lead]
  n = math.prod(w.shape[:lead])
  a_NIr = a.astype(jnp.float32).reshape(n, -1, rank)
  b_NrO = b.astype(jnp.float32).reshape(n, rank, -1)
  delta = jnp.matmul(a_NIr, b_NrO, precision=jax.lax.Precision.HIGHEST)
  return (w.astype(jnp.float32) + lora_scale * delta.reshape(w.shape)).astype(w.dtype)


def merge(params, model_config):
  """Params without adapters whose weights include them: what `Decoder(without_lora(
  model_config))` runs to the same logits as `Decoder(model_config)` on `params`."""

  def fold(tree):
    out = {}
    for key, value in tree.items():
      if _is_adapter(key):
        continue
      adapter = tree.get(f'{key}{SUFFIX}')
      if adapter is not None:
        value = merge_weight(value, adapter['a'], adapter['b'], scale(model_config))
      elif isinstance(value, Mapping):
        value = fold(value)
      out[key] = value
    return out

  return fold(params)


def count(params):
  """`(trainable, frozen)` parameter counts of a params tree (frozen is 0 without LoRA)."""
  trained, frozen = trainable(params)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  return size(trained), size(frozen)
