"""Gemma (the first generation, and CodeGemma): Llama's layer with RMSNorms that scale by
(1 + weight), embeddings times sqrt(hidden_size) and GeGLU, attention scaled by
head_dim ** -0.5. Gemma 2 and 3 (`gemma2`, `gemma3`) add norms after attention and the
MLP, sliding windows, their own query scale and soft-capping; Gemma has none of these.

It reads and exports GemmaForCausalLM folders. The released config.json files name the
activation `hidden_act: "gelu"`, meaning the tanh approximation (Google's reference
computes it); transformers 5 reads it so, and some 4.x releases (after its PR #35235) read
exact GELU instead. Export writes `gelu_pytorch_tanh`, which every version reads alike.
"""

from euro_lm.errors import HFError
from euro_lm.hf import gemma3, llama

ARCHITECTURES = {'gemma': 'GemmaForCausalLM'}

# euro_lm model fields that make a model Gemma rather than Llama-like, with the values
# Gemma needs (None: any value).
FIELDS = gemma3.FIELDS | {
    'post_norms': False,
    'qk_norm': False,
    'query_pre_attn_scalar': 0,
    'sliding_window': 0,
    'sliding_window_pattern': 0,
    'rope_local_theta': 0.0,
    'final_logit_softcap': 0.0,
}

# GemmaConfig's defaults (transformers 5), for fields a config.json leaves out.
_DEFAULTS = llama.DEFAULTS | {
    'vocab_size': 256_000,
    'hidden_size': 3072,
    'intermediate_size': 24576,
    'num_hidden_layers': 28,
    'num_attention_heads': 16,
    'num_key_value_heads': 16,
    'head_dim': 256,
    'hidden_act': 'gelu_pytorch_tanh',
    'tie_word_embeddings': True,
}
_ACTIVATION = 'gelu_pytorch_tanh'

param_table = llama.param_table
to_hf = llama.to_hf
from_hf = llama.from_hf
expected_hf_shapes = llama.expected_hf_shapes
unused_hf_tensors = llama.unused_hf_tensors
text_tensor_names = llama.text_tensor_names


def check_exportable(model):
  """Refuses a model with some of Gemma's features but not all that Gemma has."""
  gemma3.check_fields(model, FIELDS, 'Gemma')


def hf_config(model, **kwargs):
  """GemmaConfig fields (config.json) for a Gemma `model` section (`llama.hf_config`
  kwargs)."""
  check_exportable(model)
  config = llama.hf_config(model, **kwargs)
  del config['mlp_bias']
  config.update(
      {
          'architectures': [ARCHITECTURES['gemma']],
          'model_type': 'gemma',
          'hidden_act': _ACTIVATION,
          'hidden_activation': _ACTIVATION,  # what transformers < 5 reads
      }
  )
  return config


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of a Gemma config; refuses what euro_lm does not compute,
  naming the field."""
  text = _DEFAULTS | hf
  if text['hidden_act'] == 'gelu':  # the releases' name for the tanh approximation
    text['hidden_act'] = _ACTIVATION
  # transformers <= 4.47 reads hidden_activation instead; one that differs is ambiguous.
  if text.get('hidden_activation') not in (None, _ACTIVATION):
    raise HFError(
        f'{where}: hidden_activation={text["hidden_activation"]!r} is not supported; '
        f"Gemma's is {_ACTIVATION!r}"
    )
  if text.get('use_bidirectional_attention'):
    raise HFError(f'{where}: use_bidirectional_attention=true is not supported')
  model = llama.model_config_from_hf(text, where, activation=_ACTIVATION)
  return model | {f: v for f, v in FIELDS.items() if v is not None}
