"""Mistral: Llama's tensors, with attention over a sliding window of the latest
`sliding_window` positions (euro_lm's `model.sliding_window`; null is full attention).

A euro_lm model with a sliding window exports as MistralForCausalLM.
"""

from euro_lm.hf import llama
from euro_lm.hf.folder import positive_int

ARCHITECTURES = {'mistral': 'MistralForCausalLM'}

# MistralConfig's defaults (transformers 5) where they are not Llama's: a config.json
# without sliding_window has a window of 4096 (null is full attention).
DEFAULTS = llama.DEFAULTS | {'num_key_value_heads': 8, 'sliding_window': 4096}

param_table = llama.param_table
to_hf = llama.to_hf
from_hf = llama.from_hf
expected_hf_shapes = llama.expected_hf_shapes
unused_hf_tensors = llama.unused_hf_tensors
text_tensor_names = llama.text_tensor_names


def hf_config(model, **kwargs):
  """MistralConfig fields (config.json) for a `model` section."""
  config = llama.hf_config(model, **kwargs)
  for field in ('attention_bias', 'mlp_bias'):  # not Mistral fields
    del config[field]
  config.update(
      {
          'architectures': [ARCHITECTURES['mistral']],
          'model_type': 'mistral',
          'sliding_window': model.get('sliding_window') or None,
      }
  )
  return config


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of a Mistral config: Llama's, with its sliding window."""
  hf = DEFAULTS | hf
  window = positive_int(hf, 'sliding_window', where, nullable=True)
  return llama.model_config_from_hf(hf, where) | {'sliding_window': window or 0}
