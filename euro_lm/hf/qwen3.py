"""Qwen3: Llama's tensors plus QK-norm, an RMSNorm over each head's width of the queries and
keys before RoPE (euro_lm's `model.qk_norm`); no biases, no sliding window.

A euro_lm model with `qk_norm=True` exports as Qwen3ForCausalLM.
"""

from euro_lm.hf import llama

ARCHITECTURES = {'qwen3': 'Qwen3ForCausalLM'}

# Qwen3Config's defaults (transformers 5) where they are not Llama's.
DEFAULTS = llama.DEFAULTS | {
    'num_key_value_heads': 32,
    'head_dim': 128,
    'use_sliding_window': False,
    'sliding_window': 4096,
    'max_window_layers': 28,
}

_QK_NORMS = (
    (('layers', 'attention', 'q_norm', 'scale'), 'model.layers.{i}.self_attn.q_norm.weight', True),
    (('layers', 'attention', 'k_norm', 'scale'), 'model.layers.{i}.self_attn.k_norm.weight', True),
)

to_hf = llama.to_hf
from_hf = llama.from_hf
unused_hf_tensors = llama.unused_hf_tensors
text_tensor_names = llama.text_tensor_names


def param_table(model):
  """Llama's table with the query and key norms."""
  return llama.param_table(model) + list(_QK_NORMS)


def expected_hf_shapes(model):
  """{HF name: shape}, in `param_table` order: Llama's, then the `[head_dim]` norms."""
  shapes = llama.expected_hf_shapes(model)
  d = llama.head_dim(model)
  for _, template, _ in _QK_NORMS:
    for i in range(model['num_layers']):
      shapes[template.format(i=i)] = (d,)
  return shapes


def hf_config(model, **kwargs):
  """Qwen3Config fields (config.json) for a `model` section with qk_norm."""
  return llama.qwen_config(model, 'qwen3', ARCHITECTURES['qwen3'], **kwargs)


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of a Qwen3 config: Llama's, with qk_norm."""
  hf = DEFAULTS | hf
  llama.refuse_sliding_windows(hf, where)
  return llama.model_config_from_hf(hf, where) | {'qk_norm': True}
