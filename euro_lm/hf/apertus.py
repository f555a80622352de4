"""Apertus (the Swiss AI Initiative's open multilingual models): Qwen3's attention (QK-norm,
no biases) with Llama 3's RoPE, and an MLP without a gate, down(xIELU(up(x))), whose
activation has four scalars per layer (`model.mlp_activation='xielu'`): alpha_p and
alpha_n, which train, and the constants beta and eps, stored with the weights as
transformers stores them. Its norms are named attention_layernorm and feedforward_layernorm.

A euro_lm model with `mlp_activation='xielu'` exports as ApertusForCausalLM.
"""

from euro_lm.errors import HFError
from euro_lm.hf import llama, qwen3
from euro_lm.model.layers import XIELU_SCALARS

ARCHITECTURES = {'apertus': 'ApertusForCausalLM'}

# ApertusConfig's defaults (transformers 5) where they are not Llama's.
DEFAULTS = llama.DEFAULTS | {
    'hidden_act': 'xielu',
    'rms_norm_eps': 1e-5,
    'rope_theta': 12_000_000.0,
}
# ApertusConfig's RoPE where a config.json gives neither rope_parameters nor rope_scaling.
_ROPE = {
    'rope_type': 'llama3',
    'rope_theta': 12_000_000.0,
    'factor': 8.0,
    'original_max_position_embeddings': 8192,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
}
_NORMS = {
    '.input_layernorm.': '.attention_layernorm.',
    '.post_attention_layernorm.': '.feedforward_layernorm.',
}
# euro_lm model fields an Apertus model has, with the values it needs.
_FIELDS = {
    'qk_norm': True,
    'qkv_bias': False,
    'sliding_window': 0,
    'query_scale_beta': 0.0,
    'nope_interval': 0,
}

to_hf = llama.to_hf
from_hf = llama.from_hf
unused_hf_tensors = llama.unused_hf_tensors
text_tensor_names = llama.text_tensor_names


def _projections_and_norms(model):
  """Qwen3's table without the gate, with Apertus' norm names."""
  table = []
  for path, template, per_layer in qwen3.param_table(model):
    if path[-1] == 'w_gate':
      continue
    for old, new in _NORMS.items():
      template = template.replace(old, new)
    table.append((path, template, per_layer))
  return table


def param_table(model):
  """[(euro_lm path, HF name template, per layer)]: projections and norms, then xIELU's."""
  xielu = [(('layers', 'mlp', name), _xielu_template(name), True) for name in XIELU_SCALARS]
  return _projections_and_norms(model) + xielu


def expected_hf_shapes(model):
  """{HF name: shape}, in `param_table` order."""
  shapes = llama.expected_hf_shapes(model, _projections_and_norms(model))
  for name, (_, shape) in XIELU_SCALARS.items():
    for i in range(model['num_layers']):
      shapes[_xielu_template(name).format(i=i)] = shape
  return shapes


def _xielu_template(name):
  """The HF name template of xIELU's scalar `name` (xielu_alpha_p: act_fn.alpha_p)."""
  return f'model.layers.{{i}}.mlp.act_fn.{name.removeprefix("xielu_")}'


def check_exportable(model):
  """Refuses an xIELU model that is no Apertus: without QK-norm, or with another family's
  feature."""
  wrong = [
      f'model.{f}={model.get(f)!r}'
      for f, want in _FIELDS.items()
      if bool(model.get(f)) != bool(want)
  ]
  if wrong:
    need = ', '.join(f'model.{f}={w!r}' for f, w in _FIELDS.items())
    raise HFError(
        f"{', '.join(wrong)} with model.mlp_activation='xielu' is no Hugging Face architecture "
        f'that euro_lm exports: Apertus needs {need}'
    )


def hf_config(model, **kwargs):
  """ApertusConfig fields (config.json) for a `model` section with xIELU."""
  config = llama.hf_config(model, **kwargs)
  del config['mlp_bias']  # not an Apertus field
  config.update(
      {
          'architectures': [ARCHITECTURES['apertus']],
          'model_type': 'apertus',
          'hidden_act': 'xielu',
      }
  )
  return config


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of an Apertus config: Llama's, with QK-norm and xIELU. As
  transformers 5 reads it: without rope_parameters or rope_scaling (null counts as
  without), ApertusConfig's Llama 3 scaling, whatever rope_theta says; a theta left out is
  12M."""
  if not hf.get('rope_parameters') and not hf.get('rope_scaling'):
    hf = hf | {'rope_parameters': _ROPE, 'rope_scaling': None}
  hf = DEFAULTS | hf
  return llama.model_config_from_hf(hf, where, activation='xielu') | {
      'qk_norm': True,
      'mlp_activation': 'xielu',
  }
