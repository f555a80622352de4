"""Gemma 2: Gemma 3's layer without QK-norm (RMSNorms that scale by (1 + weight) before and
after attention and the MLP, embeddings times sqrt(hidden_size), GeGLU, attention scaled by
query_pre_attn_scalar), with the attention scores and the output logits soft-capped
(`cap * tanh(x / cap)`), and local layers (a sliding window) alternating with global ones,
all with one RoPE.

It reads and exports Gemma2ForCausalLM folders, through `gemma3`'s shared parts; a
config.json may leave out fields at their transformers defaults (soft-capping included).
"""

from euro_lm.hf import gemma3, llama

ARCHITECTURES = {'gemma2': 'Gemma2ForCausalLM'}

# euro_lm model fields that make a model Gemma 2 rather than Llama-like, with the values
# Gemma 2 needs (None: any value).
FIELDS = gemma3.FIELDS | {'qk_norm': False, 'rope_local_theta': 0.0, 'attn_logit_softcap': None}

# Gemma2Config's defaults (transformers 5), for fields a config.json leaves out.
_DEFAULTS = {
    'vocab_size': 256_000,
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
    'final_logit_softcapping': 30.0,
    'attn_logit_softcapping': 50.0,
}
# Without layer_types every other layer is local, the first one included.
_PATTERN = 2

_NORMS = ('q_norm', 'k_norm')

to_hf = llama.to_hf
from_hf = llama.from_hf
unused_hf_tensors = llama.unused_hf_tensors
text_tensor_names = llama.text_tensor_names


def check_exportable(model):
  """Refuses a model with some of Gemma 2's features but not all that Gemma 2 has."""
  gemma3.check_fields(model, FIELDS, 'Gemma 2')
  gemma3.check_windows(model, 'model.sliding_window=0', 'Gemma 2')


def param_table(model):
  """[(euro_lm path, HF name template, per layer)] of a Gemma 2 `model` section: Gemma 3's
  without the QK-norms."""
  return [p for p in gemma3.param_table(model) if not set(p[0]) & set(_NORMS)]


def expected_hf_shapes(model):
  return llama.expected_hf_shapes(model, param_table(model))


def hf_config(model, **kwargs):
  """Gemma2Config fields (config.json) for a Gemma 2 `model` section (`llama.hf_config`
  kwargs)."""
  check_exportable(model)
  config = gemma3.shared_hf_config(model, **kwargs)
  config.update({'architectures': ['Gemma2ForCausalLM'], 'model_type': 'gemma2'})
  return config


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of a Gemma 2 config; refuses what euro_lm does not compute,
  naming the field."""
  text = _DEFAULTS | hf
  model = gemma3.shared_fields(text, where, 'Gemma 2') | llama.rope_fields(text, where)
  model['sliding_window_pattern'] = gemma3.pattern_from_hf(
      text, model['num_layers'], where, _PATTERN
  )
  model |= {f: v for f, v in FIELDS.items() if v is not None}
  gemma3.check_windows(model, f'{where}: sliding_window=null', 'Gemma 2')
  return model
