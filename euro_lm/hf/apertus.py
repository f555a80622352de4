"""Apertus (the Swiss AI Initiative's open multilingual models): Qwen3's attention (QK-norm,
no biases) with Llama 3's RoPE, and an MLP without a gate, down(xIELU(up(x))), whose
activation has four scalars per layer (`model.mlp_activation='xielu'`): alpha_p and
alpha_n, which train, and the constants beta and eps, stored with the weights as
transformers stores them. Its norms are named attention_layernorm and feedforward_layernorm.

A euro_lm model with `mlp_activation='xielu'` exports as ApertusForCausalLM.
"""

from euro_lm.errors import HFError
from euro_lm.hf import llama, qwen3

ARCHITECTURES = {'apertus': 'ApertusForCausalLM'}

# ApertusConfig's defaults (transformers 5) where they are not Llama's.
DEFAULTS = llama.DEFAULTS | {'hidden_act': 'xielu', 'rms_norm_eps': 1e-5}
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
# xIELU's scalars: (euro_lm name, HF name, shape).
_XIELU = (
    ('xielu_alpha_p', 'alpha_p', (1,)),
    ('xielu_alpha_n', 'alpha_n', (1,)),
    ('xielu_beta', 'beta', ()),
    ('xielu_eps', 'eps', ()),
)
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
  xielu = [
      (('layers', 'mlp', name), f'model.layers.{{i}}.mlp.act_fn.{hf}', True)
      for name, hf, _ in _XIELU
  ]
  return _projections_and_norms(model) + xielu


def expected_hf_shapes(model):
  """{HF name: shape}, in `param_table` order."""
  shapes = llama.expected_hf_shapes(model, _projections_and_norms(model))
  for _, hf, shape in _XIELU:
    for i in range(model['num_layers']):
      shapes[f'model.layers.{i}.mlp.act_fn.{hf}'] = shape
  return shapes


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
  """euro_lm `model` fields of an Apertus config: Llama's, with QK-norm and xIELU; without
  any RoPE field, ApertusConfig's Llama 3 scaling."""
  if not any(k in hf for k in ('rope_parameters', 'rope_scaling', 'rope_theta')):
    hf = hf | {'rope_parameters': _ROPE}
  hf = DEFAULTS | hf
  return llama.model_config_from_hf(hf, where, activation='xielu') | {
      'qk_norm': True,
      'mlp_activation': 'xielu',
  }
