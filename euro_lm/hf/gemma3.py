"""Gemma 3 (text): Llama's projections with QK-norm, RMSNorms that scale by (1 + weight)
before and after attention and the MLP, embeddings times sqrt(hidden_size), GeGLU, attention
scaled by query_pre_attn_scalar, and local layers (a sliding window, their own RoPE base)
between global ones (every `sliding_window_pattern`th layer; full attention, `rope_theta`
with its scaling). The logits may be soft-capped as Gemma 2's: transformers'
Gemma3ForCausalLM caps them where final_logit_softcapping is set; its multimodal class and
the attention scores are never capped. The `gemma` and `gemma2` modules build on this one.

It reads Gemma3ForCausalLM folders (model_type 'gemma3_text') and the language model of
Gemma3ForConditionalGeneration ones (model_type 'gemma3'; its vision tower is skipped), and
exports Gemma3ForCausalLM. A config.json may leave out fields at their transformers
defaults (the released multimodal ones do), so those defaults are read here too.
"""

from euro_lm.errors import HFError
from euro_lm.hf import llama, multimodal
from euro_lm.hf.folder import boolean, positive_float, positive_int
from euro_lm.model.layers import local_layers

ARCHITECTURES = {
    'gemma3_text': 'Gemma3ForCausalLM',
    'gemma3': 'Gemma3ForConditionalGeneration',
}

# euro_lm model fields that make a model Gemma 3 rather than Llama-like, with the values
# Gemma 3 needs (None: any value).
FIELDS = {
    'norm_plus_one': True,
    'post_norms': True,
    'scale_embeddings': True,
    'mlp_activation': 'gelu_tanh',
    'qk_norm': True,
    'qkv_bias': False,
    'query_pre_attn_scalar': None,
    'sliding_window_pattern': None,
    'rope_local_theta': None,
    'attn_logit_softcap': 0.0,
    'final_logit_softcap': None,
    'query_scale_beta': 0.0,
    'nope_interval': 0,
}

# Gemma3TextConfig's defaults (transformers 5), for fields a config.json leaves out.
_DEFAULTS = {
    'vocab_size': 262_208,
    'hidden_size': 2304,
    'intermediate_size': 9216,
    'num_hidden_layers': 26,
    'num_attention_heads': 8,
    'num_key_value_heads': 4,
    'head_dim': 256,
    'hidden_activation': 'gelu_pytorch_tanh',
    'rms_norm_eps': 1e-6,
    'tie_word_embeddings': True,
    'query_pre_attn_scalar': 256,
    'sliding_window': 4096,
    'sliding_window_pattern': 6,
    'rope_theta': 1_000_000.0,
    'rope_local_base_freq': 10_000.0,
    'max_position_embeddings': 131_072,
}

_LAYER = 'model.layers.{i}.'
_PARAMS = (
    (('embedding',), 'model.embed_tokens.weight', False),
    (('layers', 'attention', 'wq'), _LAYER + 'self_attn.q_proj.weight', True),
    (('layers', 'attention', 'wk'), _LAYER + 'self_attn.k_proj.weight', True),
    (('layers', 'attention', 'wv'), _LAYER + 'self_attn.v_proj.weight', True),
    (('layers', 'attention', 'wo'), _LAYER + 'self_attn.o_proj.weight', True),
    (('layers', 'attention', 'q_norm', 'scale'), _LAYER + 'self_attn.q_norm.weight', True),
    (('layers', 'attention', 'k_norm', 'scale'), _LAYER + 'self_attn.k_norm.weight', True),
    (('layers', 'mlp', 'w_gate'), _LAYER + 'mlp.gate_proj.weight', True),
    (('layers', 'mlp', 'w_up'), _LAYER + 'mlp.up_proj.weight', True),
    (('layers', 'mlp', 'w_down'), _LAYER + 'mlp.down_proj.weight', True),
    (('layers', 'attention_norm', 'scale'), _LAYER + 'input_layernorm.weight', True),
    (('layers', 'attention_out_norm', 'scale'), _LAYER + 'post_attention_layernorm.weight', True),
    (('layers', 'mlp_norm', 'scale'), _LAYER + 'pre_feedforward_layernorm.weight', True),
    (('layers', 'mlp_out_norm', 'scale'), _LAYER + 'post_feedforward_layernorm.weight', True),
    (('final_norm', 'scale'), 'model.norm.weight', False),
    (('output',), 'lm_head.weight', False),
)

to_hf = llama.to_hf
from_hf = llama.from_hf
unused_hf_tensors = llama.unused_hf_tensors


def is_gemma(model):
  """Whether a `model` config section uses any field that only the Gemma families have."""
  return bool(
      model.get('norm_plus_one')
      or model.get('post_norms')
      or model.get('scale_embeddings')
      or model.get('mlp_activation') == 'gelu_tanh'
      or model.get('query_pre_attn_scalar')
      or model.get('sliding_window_pattern')
      or model.get('rope_local_theta')
      or model.get('attn_logit_softcap')
      or model.get('final_logit_softcap')
  )


def check_exportable(model):
  """Refuses a model with some of Gemma 3's features but not all that Gemma 3 has, or with
  YaRN untruncated (transformers' Gemma 3 always truncates its range)."""
  check_fields(model, FIELDS, 'Gemma 3')
  if model.get('rope_scaling') == 'yarn' and not model.get('rope_yarn_truncate', True):
    raise HFError(
        'model.rope_yarn_truncate=False is no Gemma 3 that transformers runs: it truncates '
        "YaRN's range of dimensions for Gemma 3 always"
    )
  check_windows(model, 'model.sliding_window=0', 'Gemma 3')


def check_fields(model, fields, family):
  """Refuses a `model` section unlike `family` in the `fields` it fixes (`FIELDS`)."""
  # A field a run's config leaves out (older runs) is off: None, False and 0 are alike.
  wrong = [
      f'model.{f}={model.get(f)!r}'
      for f, want in fields.items()
      if want is not None and model.get(f) != want and (model.get(f) or want)
  ]
  if wrong:
    need = ', '.join(f'model.{f}={w!r}' for f, w in fields.items() if w is not None)
    raise HFError(
        f'{", ".join(wrong)} with the other Gemma fields is no Hugging Face architecture that '
        f'euro_lm exports: {family} needs {need} (euro_lm writes Gemma 3 for model.qk_norm, '
        'Gemma 2 for model.post_norms without it, else Gemma)'
    )


def param_table(model):
  """[(euro_lm path, HF name template, per layer)] of a Gemma 3 `model` section."""
  return [p for p in _PARAMS if p[0] != ('output',) or not model['tie_embeddings']]


def expected_hf_shapes(model):
  return llama.expected_hf_shapes(model, param_table(model))


def text_tensor_names(names, hf, where, log):
  """{Gemma3ForCausalLM name: name in the folder}; of a multimodal folder, the language
  model's tensors, renamed (`multimodal.text_tensor_names`)."""
  if hf.get('model_type') != 'gemma3':
    return llama.text_tensor_names(names, hf, where, log)
  return multimodal.text_tensor_names(names, hf, where, log, 'Gemma3ForCausalLM')


# ----------------------------------------------------------------------------- configs


def layer_types(model):
  """HF's layer_types of a `model` section (a dict)."""
  return ['sliding_attention' if local else 'full_attention' for local in local_layers(model)]


def hf_config(
    model,
    *,
    bos_token_id,
    eos_token_id,
    pad_token_id=None,
    max_position_embeddings=4096,
    dtype='bfloat16',
):
  """Gemma3TextConfig fields (config.json) for a Gemma 3 `model` section."""
  check_exportable(model)
  config = shared_hf_config(
      model,
      bos_token_id=bos_token_id,
      eos_token_id=eos_token_id,
      pad_token_id=pad_token_id,
      max_position_embeddings=max_position_embeddings,
      dtype=dtype,
  )
  full = llama.hf_rope(model)
  local_theta = model.get('rope_local_theta') or model['rope_theta']
  local = {'rope_type': 'default', 'rope_theta': float(local_theta)}
  if not model.get('rope_local_theta'):
    local = full  # local layers rotate as the global ones
  config.update(
      {
          'architectures': ['Gemma3ForCausalLM'],
          'model_type': 'gemma3_text',
          # transformers >= 5 reads rope_parameters per layer type; older versions
          # rope_theta, rope_scaling (global layers) and rope_local_base_freq.
          'rope_parameters': {'full_attention': full, 'sliding_attention': local},
          'rope_local_base_freq': float(local_theta),
      }
  )
  if model.get('sliding_window_pattern'):
    config['sliding_window_pattern'] = model['sliding_window_pattern']  # transformers < 5
  return config


def shared_hf_config(model, **kwargs):
  """The config.json fields Gemma 2 and 3 share, from llama's (`llama.hf_config` kwargs)."""
  config = llama.hf_config(model, **kwargs)
  del config['hidden_act'], config['mlp_bias']
  config.update(
      {
          'hidden_activation': 'gelu_pytorch_tanh',
          'query_pre_attn_scalar': model.get('query_pre_attn_scalar') or llama.head_dim(model),
          'sliding_window': model.get('sliding_window') or None,
          'layer_types': layer_types(model),
          'final_logit_softcapping': model.get('final_logit_softcap') or None,
          'attn_logit_softcapping': model.get('attn_logit_softcap') or None,
          'use_bidirectional_attention': False,
      }
  )
  return config


def _text_config(hf, where):
  """(the text model's config dict, how errors name it) of a gemma3 or gemma3_text config;
  a multimodal one's text_config ties its embeddings as the outer config says where it
  says nothing itself."""
  if hf.get('model_type') != 'gemma3':
    return hf, where
  text, text_where = multimodal.text_config(hf, where)
  if 'tie_word_embeddings' not in text and 'tie_word_embeddings' in hf:
    text['tie_word_embeddings'] = hf['tie_word_embeddings']
  return text, text_where


def _rope(text, where):
  """euro_lm's rope_* fields: the global layers' from rope_parameters.full_attention (or
  rope_theta and rope_scaling), the local layers' base from .sliding_attention (or
  rope_local_base_freq), as Gemma3TextConfig reads them."""
  params = text.get('rope_parameters') or {}
  if not isinstance(params, dict):
    raise HFError(f'{where}: rope_parameters={params!r} must be an object or null')
  full = dict(params.get('full_attention') or {})
  sliding = dict(params.get('sliding_attention') or {})
  scaling = text.get('rope_scaling')
  if scaling is not None and not isinstance(scaling, dict):
    raise HFError(f'{where}: rope_scaling={scaling!r} must be an object or null')
  full.update(scaling or {})
  full.setdefault('rope_theta', text.get('rope_theta', _DEFAULTS['rope_theta']))
  sliding.setdefault(
      'rope_theta', text.get('rope_local_base_freq', _DEFAULTS['rope_local_base_freq'])
  )
  local_type = sliding.get('rope_type', sliding.get('type', 'default'))
  if local_type != 'default':
    raise HFError(
        f'{where}: rope_parameters.sliding_attention.rope_type={local_type!r} is not '
        "supported; euro_lm's local layers use plain RoPE"
    )
  positions = text.get('max_position_embeddings', _DEFAULTS['max_position_embeddings'])
  fields = llama.rope_fields(
      {'rope_parameters': full, 'max_position_embeddings': positions}, f'{where} (full_attention)'
  )
  if fields['rope_scaling'] == 'yarn':  # transformers reads truncate beside the layer types
    fields['rope_yarn_truncate'] = bool(params.get('truncate', True))
  return fields | {'rope_local_theta': float(sliding['rope_theta'])}


def pattern_from_hf(text, num_layers, where, declared):
  """model.sliding_window_pattern from layer_types (else `declared`, the config's
  sliding_window_pattern or the family's); refuses layer types that are not every Nth
  layer global."""
  types = text.get('layer_types')
  if types is None:
    pattern = declared
  else:
    if not isinstance(types, list) or len(types) != num_layers:
      raise HFError(f'{where}: layer_types must list {num_layers} layer types, not {types!r}')
    full = [i for i, t in enumerate(types) if t == 'full_attention']
    # All local: any pattern longer than the stack says so; keep the declared one if it does.
    longer = isinstance(declared, int) and declared > num_layers
    pattern = full[0] + 1 if full else (declared if longer else num_layers + 1)
    want = layer_types({'num_layers': num_layers, 'sliding_window_pattern': pattern})
    if types != want:
      raise HFError(
          f'{where}: layer_types={types!r} is not supported; euro_lm supports every Nth '
          "layer 'full_attention' and the others 'sliding_attention' (sliding_window_pattern)"
      )
  if not isinstance(pattern, int) or pattern <= 0:
    raise HFError(f'{where}: sliding_window_pattern={pattern!r} must be a positive integer')
  return pattern


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of a Gemma 3 config (text, or a multimodal one's text_config);
  refuses what euro_lm does not compute, naming the field."""
  text, where = _text_config(hf, where)
  text = _DEFAULTS | text
  ignored = ['attn_logit_softcapping']  # fields transformers keeps but does not apply
  if hf.get('model_type') == 'gemma3':
    ignored.append('final_logit_softcapping')  # Gemma3ForConditionalGeneration's
  for field in ignored:
    if text.get(field) is not None:
      raise HFError(
          f"{where}: {field}={text[field]!r} is not supported: transformers' "
          f'{(hf.get("architectures") or ["Gemma 3"])[0]} does not apply it (null)'
      )
  model = shared_fields(text, where, 'Gemma 3') | _rope(text, where)
  declared = text.get('sliding_window_pattern', _DEFAULTS['sliding_window_pattern'])
  model['sliding_window_pattern'] = pattern_from_hf(text, model['num_layers'], where, declared)
  model |= {f: v for f, v in FIELDS.items() if v is not None}
  check_windows(model, f'{where}: sliding_window=null', 'Gemma 3')
  return model


def shared_fields(text, where, family):
  """The `model` fields Gemma 2 and 3 configs give alike (all but RoPE and the layer
  pattern); refuses bidirectional attention, biases and another activation."""
  for field in ('use_bidirectional_attention', 'attention_bias'):
    if text.get(field):
      raise HFError(f'{where}: {field}=true is not supported')
  act = text['hidden_activation']
  if act != 'gelu_pytorch_tanh':
    raise HFError(
        f"{where}: hidden_activation={act!r} is not supported; {family}'s is " "'gelu_pytorch_tanh'"
    )
  heads = positive_int(text, 'num_attention_heads', where)
  kv_heads = positive_int(text, 'num_key_value_heads', where)
  llama.check_heads(heads, kv_heads, where)
  cap = lambda field: positive_float(text, field, where, nullable=True) or 0.0  # noqa: E731
  return {
      'vocab_size': positive_int(text, 'vocab_size', where),
      'num_layers': positive_int(text, 'num_hidden_layers', where),
      'embed_dim': positive_int(text, 'hidden_size', where),
      'num_heads': heads,
      'num_kv_heads': kv_heads,
      'head_dim': positive_int(text, 'head_dim', where),
      'mlp_dim': positive_int(text, 'intermediate_size', where),
      'norm_eps': positive_float(text, 'rms_norm_eps', where),
      'tie_embeddings': boolean(text, 'tie_word_embeddings', where),
      'sliding_window': positive_int(text, 'sliding_window', where, nullable=True) or 0,
      'query_pre_attn_scalar': positive_int(text, 'query_pre_attn_scalar', where),
      'attn_logit_softcap': cap('attn_logit_softcapping'),
      'final_logit_softcap': cap('final_logit_softcapping'),
  }


def check_windows(model, what, family):
  """Refuses local layers without a window: transformers' Gemma 2 and 3 cannot run them."""
  if not model['sliding_window'] and any(local_layers(model)):
    pattern = model['sliding_window_pattern']
    which = f'every layer but each {pattern}th' if pattern else 'every layer'
    raise HFError(
        f'{what} with sliding_attention layers ({which}) is no {family} that transformers '
        'runs; its local layers attend within a window'
    )
