"""Mistral: Llama's tensors, with attention over a sliding window of the latest
`sliding_window` positions (euro_lm's `model.sliding_window`; null is full attention).

It reads MistralForCausalLM folders and the language model of
Mistral3ForConditionalGeneration ones (Mistral Small 3.1 and 3.2, Magistral Small): a
`text_config` of model_type 'mistral' (a 'ministral3' one is `ministral3`'s); the
vision tower and projector are skipped. A euro_lm model with a sliding window exports as
MistralForCausalLM; one without (Mistral 7B v0.3, Mistral 3) computes what Llama does and
exports as LlamaForCausalLM.
"""

from euro_lm.errors import HFError
from euro_lm.hf import llama, multimodal
from euro_lm.hf.folder import boolean, positive_int

ARCHITECTURES = {
    'mistral': 'MistralForCausalLM',
    'mistral3': 'Mistral3ForConditionalGeneration',
}

# MistralConfig's defaults (transformers 5) where they are not Llama's: a config.json
# without sliding_window has a window of 4096 (null is full attention).
DEFAULTS = llama.DEFAULTS | {'num_key_value_heads': 8, 'sliding_window': 4096}

param_table = llama.param_table
to_hf = llama.to_hf
from_hf = llama.from_hf
expected_hf_shapes = llama.expected_hf_shapes
unused_hf_tensors = llama.unused_hf_tensors


def text_tensor_names(names, hf, where, log):
  """{MistralForCausalLM name: name in the folder}; of a Mistral 3 folder, the language
  model's tensors, renamed (`multimodal.text_tensor_names`)."""
  if hf.get('model_type') != 'mistral3':
    return llama.text_tensor_names(names, hf, where, log)
  window = model_config_from_hf(hf, where)['sliding_window']
  exported_as = ARCHITECTURES['mistral'] if window else 'LlamaForCausalLM'

  return multimodal.text_tensor_names(names, hf, where, log, exported_as)


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
  """euro_lm `model` fields of a Mistral config (or a Mistral 3 one's text_config):
  Llama's, with its sliding window."""
  if hf.get('model_type') == 'mistral3':
    hf, where = text_config(hf, where)
  hf = DEFAULTS | hf
  window = positive_int(hf, 'sliding_window', where, nullable=True)
  return llama.model_config_from_hf(hf, where) | {'sliding_window': window or 0}


def text_config(hf, where):
  """(the language model's config dict, how errors name it) of a Mistral 3 config. Whether
  its embeddings are tied: the outer config's tie_word_embeddings where it says, else the
  text config's, else not. transformers 5 reads only the outer one (true by default) but
  runs a stored lm_head that differs from the embeddings: so the released folders (neither
  says, an lm_head stored) run untied, as here, and the folders it saves say it outright.
  What else it may run (no lm_head stored where euro_lm reads untied; a tied text config
  with another lm_head stored) is refused by the import, naming the tensor."""
  text, text_where = multimodal.text_config(hf, where)
  text.setdefault('model_type', 'mistral')  # Mistral3Config's default text model
  if text['model_type'] not in ('mistral', 'ministral3'):
    raise HFError(
        f'{text_where}: model_type={text.get("model_type")!r} is not supported; euro_lm '
        "imports the language model of a Mistral 3 folder whose text model is 'mistral' or "
        "'ministral3'"
    )
  if 'tie_word_embeddings' in hf:
    text['tie_word_embeddings'] = boolean(hf, 'tie_word_embeddings', where)
  else:
    text.setdefault('tie_word_embeddings', False)
  return text, text_where
