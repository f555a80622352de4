"""Which architecture module reads an HF config, and which one writes a euro_lm model.

An architecture module (`llama`, `mistral`, `ministral3`, `qwen2`, `qwen3`, `smollm3`,
`apertus`, `gemma`, `gemma2`, `gemma3`) holds one family's mapping table and config translation:
  ARCHITECTURES                      {model_type: HF class} of the checkpoints it reads
  param_table(model)                 [(euro_lm path, HF name template, per layer)]
  to_hf(path, x, model), from_hf     one tensor converted, either way
  expected_hf_shapes(model)          {HF name: shape}, in writing order
  unused_hf_tensors(names, model, where)   the tensors import skips; refuses foreign ones
  text_tensor_names(names, hf, where, log) {table name: stored name}: a multimodal folder's
                                     language model under its text model's names
  hf_config(model, ...)              config.json for export
  model_config_from_hf(hf, where)    euro_lm `model` fields for import
The export and import drivers go through these names only.
"""

from euro_lm.errors import HFError
from euro_lm.hf import (
    apertus,
    gemma,
    gemma2,
    gemma3,
    llama,
    ministral3,
    mistral,
    qwen2,
    qwen3,
    smollm3,
)

_MODULES = (llama, mistral, ministral3, qwen2, qwen3, smollm3, apertus, gemma, gemma2, gemma3)
_BY_MODEL_TYPE = {t: m for m in _MODULES for t in m.ARCHITECTURES}
# model_type -> HF class, of every checkpoint euro_lm imports.
ARCHITECTURES = {t: c for m in _MODULES for t, c in m.ARCHITECTURES.items()}


def for_hf_config(hf, where='config.json'):
  """The module that reads the HF config dict `hf`; refuses an unknown model_type or
  architectures entry, naming the field."""
  model_type = hf.get('model_type')
  if model_type not in _BY_MODEL_TYPE:
    raise HFError(
        f'{where}: model_type={model_type!r} is not supported; euro_lm imports '
        f'{", ".join(sorted(ARCHITECTURES))}'
    )
  for arch in hf.get('architectures') or []:
    if arch not in ARCHITECTURES.values():
      raise HFError(
          f'{where}: architectures={hf["architectures"]!r} is not supported; '
          f'euro_lm imports {", ".join(sorted(ARCHITECTURES.values()))}'
      )
  text = hf.get('text_config')
  if model_type == 'mistral3' and isinstance(text, dict) and text.get('model_type') == 'ministral3':
    return ministral3  # a Mistral 3 folder whose text model is Ministral 3
  return _BY_MODEL_TYPE[model_type]


def for_model(model):
  """The module that exports euro_lm's `model` config section: with any Gemma field
  (`gemma3.FIELDS`) Gemma 3 with QK-norm, Gemma 2 with norms after attention and the MLP,
  else Gemma; else Apertus with xIELU; else Qwen3 with QK-norm, Qwen2 with projection
  biases, Ministral 3 with query scaling, Mistral with a sliding window, SmolLM3 with NoPE
  layers, else Llama. Refuses a model that no one architecture expresses."""
  if gemma3.is_gemma(model):
    family = gemma3 if model.get('qk_norm') else gemma2 if model.get('post_norms') else gemma
    family.check_exportable(model)
    return family
  if model.get('mlp_activation') == 'xielu':
    apertus.check_exportable(model)
    return apertus
  features = {
      qwen3: 'model.qk_norm',
      qwen2: 'model.qkv_bias',
      ministral3: 'model.query_scale_beta',
      mistral: 'model.sliding_window',
      smollm3: 'model.nope_interval',
  }
  chosen = [arch for arch, field in features.items() if model.get(field.split('.')[1])]
  if ministral3 in chosen and mistral in chosen:
    chosen.remove(mistral)  # Ministral 3 has Mistral's window
  if len(chosen) > 1:
    raise HFError(
        f'{" and ".join(features[a] for a in chosen)} together are no Hugging Face '
        'architecture that euro_lm exports (Qwen3 has QK-norm, Qwen2 biases, Ministral 3 '
        'query scaling, Mistral a sliding window, SmolLM3 NoPE layers)'
    )
  return chosen[0] if chosen else llama


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields from an HF config dict, by the architecture that reads it."""
  return for_hf_config(hf, where).model_config_from_hf(hf, where)
