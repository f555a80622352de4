"""The Llama family: HF tensor names and shapes, and the HF config, both directions.

euro_lm's decoder is HF `LlamaForCausalLM` up to names, reshapes and transposes (never a
permutation): RoPE is rotate-half in both. Layer weights are stacked `[num_layers, ...]` by
`nn.scan` here and split into `model.layers.{i}.*` there. torch Linear weights are
`[out, in]`; ours are `[in, ...]` einsum params, hence the transposes.

Export writes model_type llama; the Mistral and Qwen modules build on this one.
"""

from euro_lm.errors import HFError
from euro_lm.hf.folder import boolean, positive_float, positive_int
from euro_lm.model.layers import rope_attention_factor, yarn_mscale

# model_type -> the HF class of the checkpoints this module reads.
ARCHITECTURES = {
    'llama': 'LlamaForCausalLM',
}

# LlamaConfig's defaults (transformers 5) for the fields a config.json may leave out and
# import reads; null num_key_value_heads and head_dim are derived, as transformers does.
# Size fields are required: transformers' defaults (a 7B) never fit a real folder's tensors.
DEFAULTS = {
    'num_key_value_heads': None,
    'head_dim': None,
    'hidden_act': 'silu',
    'rms_norm_eps': 1e-6,
    'rope_theta': 10_000.0,
    'tie_word_embeddings': False,
}

# (euro_lm param path, HF name, per layer). Per-layer HF names take the layer index `i`.
_PARAMS = (
    (('embedding',), 'model.embed_tokens.weight', False),
    (('layers', 'attention', 'wq'), 'model.layers.{i}.self_attn.q_proj.weight', True),
    (('layers', 'attention', 'wk'), 'model.layers.{i}.self_attn.k_proj.weight', True),
    (('layers', 'attention', 'wv'), 'model.layers.{i}.self_attn.v_proj.weight', True),
    (('layers', 'attention', 'wo'), 'model.layers.{i}.self_attn.o_proj.weight', True),
    (('layers', 'mlp', 'w_gate'), 'model.layers.{i}.mlp.gate_proj.weight', True),
    (('layers', 'mlp', 'w_up'), 'model.layers.{i}.mlp.up_proj.weight', True),
    (('layers', 'mlp', 'w_down'), 'model.layers.{i}.mlp.down_proj.weight', True),
    (('layers', 'attention_norm', 'scale'), 'model.layers.{i}.input_layernorm.weight', True),
    (('layers', 'mlp_norm', 'scale'), 'model.layers.{i}.post_attention_layernorm.weight', True),
    (('final_norm', 'scale'), 'model.norm.weight', False),
    (('output',), 'lm_head.weight', False),
)


def param_table(model):
  """[(euro_lm path, HF name template, per layer)] for the `model` config section."""
  return [p for p in _PARAMS if p[0] != ('output',) or not model['tie_embeddings']]


def head_dim(model):
  return model['head_dim'] or model['embed_dim'] // model['num_heads']


def to_hf(path, x, model):
  """One euro_lm param (one layer's slice if stacked) as the HF tensor: a torch Linear
  weight `[out, in]`, an embedding `[V, D]` or a norm scale `[D]`."""
  name = path[-1]
  if name in ('wq', 'wk', 'wv'):  # [D, H or K, d] -> [(H or K) * d, D]
    return x.reshape(x.shape[0], -1).T
  if name == 'wo':  # [H, d, D] -> [D, H * d]
    return x.reshape(-1, x.shape[-1]).T
  if name in ('w_gate', 'w_up', 'w_down', 'output'):
    return x.T
  return x


def from_hf(path, x, model):
  """The inverse of `to_hf`: one HF tensor as the euro_lm param (one layer's slice)."""
  name, d = path[-1], head_dim(model)
  if name in ('wq', 'wk', 'wv'):  # [(H or K) * d, D] -> [D, H or K, d]
    return x.T.reshape(x.shape[1], -1, d)
  if name == 'wo':  # [D, H * d] -> [H, d, D]
    return x.T.reshape(-1, d, x.shape[0])
  if name in ('w_gate', 'w_up', 'w_down', 'output'):
    return x.T
  return x


def expected_hf_shapes(model, table=None):
  """{HF name: shape} of every tensor of `model` (a `model` config section, as a dict) in
  `table` (default `param_table(model)`), in its order, layer by layer."""
  D, F, V = model['embed_dim'], model['mlp_dim'], model['vocab_size']
  H, K, d = model['num_heads'], model['num_kv_heads'], head_dim(model)
  shapes = {
      'embedding': (V, D),
      'wq': (H * d, D),
      'wk': (K * d, D),
      'wv': (K * d, D),
      'wo': (D, H * d),
      'w_gate': (F, D),
      'w_up': (F, D),
      'w_down': (D, F),
      'scale': (D,),
      'output': (V, D),
  }
  out = {}
  for path, template, per_layer in param_table(model) if table is None else table:
    shape = (d,) if path[-2:-1] in (('q_norm',), ('k_norm',)) else shapes[path[-1]]
    for i in range(model['num_layers'] if per_layer else 1):
      out[template.format(i=i)] = shape
  return out


def text_tensor_names(names, hf, where, log):
  """{tensor name as `param_table` spells it: name in the folder} for the folder's tensor
  `names`; a text-only checkpoint stores them as they are."""
  del hf, where, log
  return {n: n for n in names}


def unused_hf_tensors(names, model, where):
  """The tensors among `names` that import skips: rotary caches and, for a tied model, the
  lm_head copy some checkpoints still store. Refuses bias tensors, naming `where`."""
  biases = sorted(n for n in names if n.endswith('.bias'))
  if biases:
    raise HFError(
        f'{where} has bias tensors ({biases[0]}, ...); this architecture has no biases there'
    )
  unused = {n for n in names if 'rotary_emb' in n}
  if model['tie_embeddings']:
    unused |= {'lm_head.weight'} & set(names)
  return unused


# ----------------------------------------------------------------------------- configs


def hf_config(
    model,
    *,
    bos_token_id,
    eos_token_id,
    pad_token_id=None,
    max_position_embeddings=4096,
    dtype='bfloat16',
):
  """HF LlamaConfig fields (config.json) for euro_lm's `model` section; the fields the
  Llama-like families (Qwen3) share, which they amend."""
  rope = hf_rope(model)
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': model['vocab_size'],
      'hidden_size': model['embed_dim'],
      'intermediate_size': model['mlp_dim'],
      'num_hidden_layers': model['num_layers'],
      'num_attention_heads': model['num_heads'],
      'num_key_value_heads': model['num_kv_heads'],
      'head_dim': head_dim(model),
      'hidden_act': 'silu',
      'rms_norm_eps': float(model['norm_eps']),
      # transformers >= 5 reads rope_parameters; older versions rope_theta and rope_scaling.
      'rope_theta': rope['rope_theta'],
      'rope_parameters': rope,
      'rope_scaling': None if rope['rope_type'] == 'default' else rope,
      'max_position_embeddings': int(max_position_embeddings),
      'tie_word_embeddings': bool(model['tie_embeddings']),
      'attention_bias': False,
      'mlp_bias': False,
      'attention_dropout': 0.0,
      'initializer_range': float(model['init_std']),
      'bos_token_id': bos_token_id,
      'eos_token_id': eos_token_id,
      'pad_token_id': pad_token_id,
      'use_cache': True,
      'torch_dtype': dtype,  # transformers < 5
      'dtype': dtype,
  }


# HF rope_type -> euro_lm model.rope_scaling, and the HF keys of each one's parameters
# (required; yarn's are read by `_yarn_fields`).
_ROPE_TYPES = {'default': 'none', 'linear': 'linear', 'llama3': 'llama3', 'yarn': 'yarn'}
_ROPE_KEYS = {
    'linear': {'factor': 'rope_scaling_factor'},
    'llama3': {
        'factor': 'rope_scaling_factor',
        'low_freq_factor': 'rope_low_freq_factor',
        'high_freq_factor': 'rope_high_freq_factor',
        'original_max_position_embeddings': 'rope_original_max_positions',
    },
}


def rope_fields(hf, where):
  """euro_lm's rope_* model fields from an HF config: transformers >= 5 writes
  `rope_parameters` (theta included), older versions `rope_theta` and `rope_scaling`."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  for name, value in (('rope_parameters', params), ('rope_scaling', scaling)):
    if not isinstance(value, dict):
      raise HFError(f'{where}: {name}={value!r} must be an object or null')
  # As transformers 5 reads them: a rope_scaling (the older name) replaces rope_parameters.
  where_params = 'rope_scaling' if scaling else 'rope_parameters'
  params = dict(scaling or params)
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if not isinstance(rope_type, str) or rope_type not in _ROPE_TYPES:
    raise HFError(
        f'{where}: {where_params}.rope_type={rope_type!r} is not supported; euro_lm '
        f'supports {", ".join(map(repr, _ROPE_TYPES))}'
    )
  partial = params.get('partial_rotary_factor', hf.get('partial_rotary_factor'))
  if partial not in (None, 1, 1.0) and rope_type != 'default':
    # transformers 5 rotates every dimension with unscaled RoPE, and fails with scaling.
    raise HFError(
        f'{where}: partial_rotary_factor={partial!r} with rope_type={rope_type!r} is not '
        'supported; transformers cannot run it either'
    )
  if rope_type in ('llama3', 'yarn'):
    # transformers 5: a config's own original_max_position_embeddings wins (Phi-3 keeps it
    # there), else the rope parameters', else max_position_embeddings.
    original = hf.get(
        'original_max_position_embeddings', params.get('original_max_position_embeddings')
    )
    if original is None:
      original = hf.get('max_position_embeddings')
    if isinstance(original, float) and original.is_integer():
      original = int(original)
    if original is not None:
      params['original_max_position_embeddings'] = original
  theta = {'rope_theta': params.get('rope_theta', hf.get('rope_theta', DEFAULTS['rope_theta']))}
  fields = {
      'rope_theta': positive_float(theta, 'rope_theta', where),
      'rope_scaling': _ROPE_TYPES[rope_type],
  }
  if rope_type == 'yarn':
    return fields | _yarn_fields(params, hf, f'{where}: {where_params}')
  for key, field in _ROPE_KEYS.get(rope_type, {}).items():
    if key not in params:
      raise HFError(f'{where}: {where_params}.{key} is missing for rope_type={rope_type!r}')
    read = positive_int if field == 'rope_original_max_positions' else positive_float
    fields[field] = read(params, key, f'{where}: {where_params}')
  return fields


def _yarn_fields(params, hf, where):
  """euro_lm's rope_* fields of a yarn rope_parameters (its factor key required; null is
  the ratio of max_position_embeddings to the original context, which `rope_fields` has
  settled), its left-out keys as transformers 5 fills them: beta_fast 32 and beta_slow 1
  (for any false value), truncate true (null is false), and the attention factor from
  mscale and mscale_all_dim where both are set, else from the factor (stored, so that
  export writes what import read)."""
  if 'original_max_position_embeddings' not in params:
    raise HFError(f"{where}.original_max_position_embeddings is missing for rope_type='yarn'")
  original = positive_int(params, 'original_max_position_embeddings', where)
  if 'factor' not in params:  # as transformers 5 refuses it
    raise HFError(f"{where}.factor is missing for rope_type='yarn'")
  factor = params['factor']
  if factor is None:  # transformers 5: the ratio of the two contexts
    factor = positive_int(hf, 'max_position_embeddings', where) / original
  factor = positive_float({'factor': factor}, 'factor', where)
  betas = {k: params.get(k) or default for k, default in (('beta_fast', 32.0), ('beta_slow', 1.0))}
  fast, slow = (positive_float(betas, k, where) for k in betas)
  truncate = params.get('truncate', True)
  truncate = False if truncate is None else truncate  # transformers tests it for truth
  if not isinstance(truncate, bool):
    raise HFError(f'{where}: truncate={truncate!r} must be true or false')
  attention = params.get('attention_factor')
  if attention is None:
    mscale, mscale_all_dim = params.get('mscale'), params.get('mscale_all_dim')
    if mscale and mscale_all_dim:
      attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
      attention = yarn_mscale(factor)
  return {
      'rope_scaling_factor': factor,
      'rope_original_max_positions': original,
      'rope_yarn_beta_fast': fast,
      'rope_yarn_beta_slow': slow,
      'rope_yarn_truncate': truncate,
      'rope_attention_factor': positive_float(
          {'attention_factor': attention}, 'attention_factor', where
      ),
  }


def hf_rope(model):
  """HF's rope_parameters (transformers >= 5) for euro_lm's rope_* model fields."""
  scaling = model.get('rope_scaling', 'none')
  rope_type = {v: k for k, v in _ROPE_TYPES.items()}[scaling]
  params = {'rope_type': rope_type, 'rope_theta': float(model['rope_theta'])}
  for key, field in _ROPE_KEYS.get(rope_type, {}).items():
    params[key] = model[field]
  if rope_type == 'yarn':
    params.update(
        {
            'factor': float(model['rope_scaling_factor']),
            'original_max_position_embeddings': model['rope_original_max_positions'],
            'beta_fast': float(model['rope_yarn_beta_fast']),
            'beta_slow': float(model['rope_yarn_beta_slow']),
            'truncate': bool(model['rope_yarn_truncate']),
            'attention_factor': float(rope_attention_factor(model)),
        }
    )
  return params


def model_config_from_hf(hf, where='config.json', activation='silu'):
  """euro_lm `model` fields from an HF config dict of one of `ARCHITECTURES` (which
  `euro_lm.hf.architectures` checks), its left-out fields at `DEFAULTS` (the Llama-like
  families pass their own); refuses what euro_lm cannot represent, naming the HF field.
  `activation`: the hidden_act the family computes (Gemma's is not silu); a family other
  than Llama's sets its `mlp_activation` to match."""
  hf = DEFAULTS | hf
  act = hf['hidden_act']
  if act != activation:
    raise HFError(f'{where}: hidden_act={act!r} is not supported; this family uses {activation!r}')
  for field in ('attention_bias', 'mlp_bias'):
    if hf.get(field):
      raise HFError(f'{where}: {field}=true is not supported; euro_lm layers have no biases')
  D, H = positive_int(hf, 'hidden_size', where), positive_int(hf, 'num_attention_heads', where)
  model = {
      'vocab_size': positive_int(hf, 'vocab_size', where),
      'num_layers': positive_int(hf, 'num_hidden_layers', where),
      'embed_dim': D,
      'num_heads': H,
      'num_kv_heads': positive_int(hf, 'num_key_value_heads', where, nullable=True) or H,
      'head_dim': positive_int(hf, 'head_dim', where, nullable=True) or D // H,
      'mlp_dim': positive_int(hf, 'intermediate_size', where),
      **rope_fields(hf, where),
      'norm_eps': positive_float(hf, 'rms_norm_eps', where),
      'tie_embeddings': boolean(hf, 'tie_word_embeddings', where),
      'qk_norm': False,
  }
  if not model['head_dim']:
    raise HFError(f'{where}: hidden_size={D} is less than num_attention_heads={H}')
  check_heads(H, model['num_kv_heads'], where)
  return model


def check_heads(heads, kv_heads, where):
  """Refuses query heads that the key/value heads do not divide evenly."""
  if heads % kv_heads:
    raise HFError(
        f'{where}: num_attention_heads={heads} is not a multiple of '
        f'num_key_value_heads={kv_heads}'
    )


def refuse_sliding_windows(hf, where):
  """Refuses a Qwen-style config (its left-out fields at the family's defaults) where some
  layer attends within a window: `layer_types`, or as transformers derives them without,
  the layers from `max_window_layers` on when `use_sliding_window` is true and
  `sliding_window` set."""
  types = hf.get('layer_types')
  if types is None:
    layers = positive_int(hf, 'num_hidden_layers', where)
    first = hf.get('max_window_layers')
    if hf.get('use_sliding_window') and hf.get('sliding_window') is not None:
      if not isinstance(first, int) or isinstance(first, bool):
        raise HFError(f'{where}: max_window_layers={first!r} must be an integer')
      if first < layers:
        raise HFError(
            f'{where}: use_sliding_window=true with max_window_layers={first} (of '
            f'{layers} layers) is not supported; euro_lm attends to the full causal context '
            'in every layer of this family'
        )
    return
  if not isinstance(types, list) or any(t != 'full_attention' for t in types):
    raise HFError(
        f'{where}: layer_types={types!r} is not supported; euro_lm attends to the '
        'full causal context in every layer'
    )


def qwen_config(model, model_type, architecture, **kwargs):
  """The config.json of a Qwen-style model (full attention in every layer)."""
  config = hf_config(model, **kwargs)
  layers = model['num_layers']
  config.update(
      {
          'architectures': [architecture],
          'model_type': model_type,
          'use_sliding_window': False,
          'sliding_window': None,
          'max_window_layers': layers,
          'layer_types': ['full_attention'] * layers,
      }
  )
  for field in ('attention_bias', 'mlp_bias'):  # not Qwen fields
    del config[field]
  return config
