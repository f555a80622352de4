"""The language model of a multimodal folder (Gemma3ForConditionalGeneration,
Mistral3ForConditionalGeneration): its text config, and its tensors under the names of the
text-only class, which is what euro_lm imports and exports; the vision tower and the
projector are skipped, and logged.
"""

from euro_lm.errors import HFError

# Where a multimodal class keeps its language model: under transformers 5's module names
# `model.language_model.*` (as it saves Gemma 3), or as transformers 4 wrote them (the
# released checkpoints; transformers 5 saves Mistral 3 so too) `language_model.model.*` and
# `language_model.lm_head.*`.
_TEXT_PREFIXES = {
    'model.language_model.': 'model.',
    'language_model.model.': 'model.',
    'language_model.lm_head.': 'lm_head.',
    'lm_head.': 'lm_head.',
}
_VISION_PREFIXES = (
    'vision_tower.',
    'multi_modal_projector.',
    'model.vision_tower.',
    'model.multi_modal_projector.',
)


def text_config(hf, where):
  """(the language model's config dict, how errors name it) of a multimodal config."""
  text = hf.get('text_config')
  if not isinstance(text, dict):
    raise HFError(f'{where}: text_config={text!r} must be an object')
  return dict(text), f'{where}: text_config'


def text_tensor_names(names, hf, where, log, exported_as):
  """{text-only class's tensor name: name in the folder} of the folder's tensor `names`:
  the language model's, renamed; the vision tower and projector are skipped, and logged.
  `exported_as`: the text-only class, for the log."""
  out, vision = {}, []
  for name in names:
    if name.startswith(_VISION_PREFIXES):
      vision.append(name)
      continue
    prefix = next((p for p in _TEXT_PREFIXES if name.startswith(p)), None)
    new = _TEXT_PREFIXES[prefix] + name[len(prefix) :] if prefix else name
    if new in out:
      raise HFError(f'{where}: the folder holds {new} twice ({out[new]} and {name})')
    out[new] = name
  log(
      f'{where}: {(hf.get("architectures") or [hf.get("model_type")])[0]}: importing its '
      f'language model; skipping {len(vision)} vision tower and projector tensors '
      f'(exported as {exported_as})'
  )
  return out
