"""Qwen2 and Qwen2.5: Llama's tensors plus biases on the query, key and value projections
(euro_lm's `model.qkv_bias`); no sliding window.

A euro_lm model with `qkv_bias=True` exports as Qwen2ForCausalLM.
"""

from euro_lm.hf import llama

ARCHITECTURES = {'qwen2': 'Qwen2ForCausalLM'}

# Qwen2Config's defaults (transformers 5) where they are not Llama's.
DEFAULTS = llama.DEFAULTS | {
    'num_key_value_heads': 32,
    'use_sliding_window': False,
    'sliding_window': 4096,
    'max_window_layers': 28,
}

text_tensor_names = llama.text_tensor_names

_BIASES = tuple(
    (('layers', 'attention', f'b{x}'), f'model.layers.{{i}}.self_attn.{x}_proj.bias', True)
    for x in 'qkv'
)


def unused_hf_tensors(names, model, where):
  """Llama's, where the projection biases are tensors of this family, not foreign ones."""
  ours = {t.format(i=i) for _, t, _ in _BIASES for i in range(model['num_layers'])}
  return llama.unused_hf_tensors(set(names) - ours, model, where)


def param_table(model):
  """Llama's table with the projection biases."""
  return llama.param_table(model) + list(_BIASES)


def to_hf(path, x, model):
  if path[-1] in ('bq', 'bk', 'bv'):  # [H or K, d] -> [(H or K) * d]
    return x.reshape(-1)
  return llama.to_hf(path, x, model)


def from_hf(path, x, model):
  if path[-1] in ('bq', 'bk', 'bv'):  # [(H or K) * d] -> [H or K, d]
    return x.reshape(-1, llama.head_dim(model))
  return llama.from_hf(path, x, model)


def expected_hf_shapes(model):
  """{HF name: shape}, in `param_table` order: Llama's, then the biases."""
  shapes = llama.expected_hf_shapes(model)
  d = llama.head_dim(model)
  heads = {'q': model['num_heads'], 'k': model['num_kv_heads'], 'v': model['num_kv_heads']}
  for (_, template, _), x in zip(_BIASES, 'qkv'):
    for i in range(model['num_layers']):
      shapes[template.format(i=i)] = (heads[x] * d,)
  return shapes


def hf_config(model, **kwargs):
  """Qwen2Config fields (config.json) for a `model` section with qkv_bias."""
  return llama.qwen_config(model, 'qwen2', ARCHITECTURES['qwen2'], **kwargs)


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of a Qwen2 config: Llama's, with qkv_bias."""
  hf = DEFAULTS | hf
  llama.refuse_sliding_windows(hf, where)
  return llama.model_config_from_hf(hf, where) | {'qkv_bias': True}
