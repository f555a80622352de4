"""Ministral 3: Mistral's layer (a sliding window where set) with YaRN RoPE and Llama 4's
query scaling for long contexts: queries times `1 + beta * ln(1 + floor(position /
original_max_position_embeddings))` after RoPE, beta being rope_parameters'
`llama_4_scaling_beta` (euro_lm's `model.query_scale_beta`).

It reads Ministral3ForCausalLM folders and, through `mistral`, the language model of
Mistral3ForConditionalGeneration folders whose text model is one. A euro_lm model with
`model.query_scale_beta` exports as Ministral3ForCausalLM.
"""

from euro_lm.errors import HFError
from euro_lm.hf import llama, mistral, multimodal
from euro_lm.hf.folder import positive_float

ARCHITECTURES = {'ministral3': 'Ministral3ForCausalLM'}

# Ministral3Config's defaults (transformers 5) for fields a config.json leaves out.
DEFAULTS = llama.DEFAULTS | {
    'vocab_size': 131_072,
    'hidden_size': 4096,
    'intermediate_size': 14336,
    'num_hidden_layers': 34,
    'num_attention_heads': 32,
    'num_key_value_heads': 8,
    'head_dim': 128,
    'rms_norm_eps': 1e-5,
    'max_position_embeddings': 262_144,
    'sliding_window': None,
}
# Its RoPE where a config.json gives none.
_DEFAULT_ROPE = {
    'rope_type': 'yarn',
    'rope_theta': 1_000_000.0,
    'factor': 16.0,
    'original_max_position_embeddings': 16384,
    'beta_fast': 32.0,
    'beta_slow': 1.0,
    'mscale_all_dim': 1.0,
    'mscale': 1.0,
    'llama_4_scaling_beta': 0.1,
}

param_table = llama.param_table
to_hf = llama.to_hf
from_hf = llama.from_hf
expected_hf_shapes = llama.expected_hf_shapes
unused_hf_tensors = llama.unused_hf_tensors


def text_tensor_names(names, hf, where, log):
  """{Ministral3ForCausalLM name: name in the folder}; of a Mistral 3 folder, the language
  model's tensors, renamed (`multimodal.text_tensor_names`)."""
  if hf.get('model_type') != 'mistral3':
    return llama.text_tensor_names(names, hf, where, log)
  return multimodal.text_tensor_names(names, hf, where, log, ARCHITECTURES['ministral3'])


def hf_config(model, **kwargs):
  """Ministral3Config fields (config.json) for a `model` section with query scaling."""
  if model.get('rope_scaling') not in ('yarn', 'llama3'):
    raise HFError(
        f"model.query_scale_beta with model.rope_scaling={model.get('rope_scaling')!r} is no "
        'Ministral 3 that transformers runs: its query scaling reads the original context '
        "of a 'yarn' or 'llama3' RoPE"
    )
  config = mistral.hf_config(model, **kwargs)
  config['rope_parameters']['llama_4_scaling_beta'] = float(model['query_scale_beta'])
  config.update({'architectures': [ARCHITECTURES['ministral3']], 'model_type': 'ministral3'})
  return config


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of a Ministral 3 config (or a Mistral 3 one's text_config, which
  `architectures` sends here): Mistral's, with the query scaling."""
  if hf.get('model_type') == 'mistral3':
    hf, where = mistral.text_config(hf, where)
  hf = DEFAULTS | hf
  if not hf.get('rope_parameters') and not hf.get('rope_scaling'):
    hf['rope_parameters'] = _DEFAULT_ROPE
  model = mistral.model_config_from_hf(hf, where)
  params = hf.get('rope_scaling') or hf['rope_parameters']
  where_params = f"{where}: {'rope_scaling' if hf.get('rope_scaling') else 'rope_parameters'}"
  if model['rope_scaling'] not in ('yarn', 'llama3') or 'llama_4_scaling_beta' not in params:
    raise HFError(
        f'{where_params}: Ministral 3 needs llama_4_scaling_beta and a yarn or llama3 '
        'rope_type (its query scaling reads their original context); transformers cannot '
        'run it without'
    )
  beta = positive_float(params, 'llama_4_scaling_beta', where_params)
  return model | {'query_scale_beta': beta}
