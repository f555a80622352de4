"""SmolLM3: Llama's tensors, with no position embedding in every `no_rope_layer_interval`th
layer (NoPE; euro_lm's `model.nope_interval`): those layers attend to unrotated queries and
keys, ordered by the causal mask alone.

It reads SmolLM3ForCausalLM folders whose `no_rope_layers` follow one interval (the released
ones: every 4th layer), and refuses other patterns and sliding windows, naming the field. A
euro_lm model with `nope_interval > 0` exports as SmolLM3ForCausalLM.
"""

from euro_lm.errors import HFError
from euro_lm.hf import llama
from euro_lm.hf.folder import positive_int
from euro_lm.model.layers import rope_layers

ARCHITECTURES = {'smollm3': 'SmolLM3ForCausalLM'}

# SmolLM3Config's defaults (transformers 5) where they are not Llama's.
DEFAULTS = llama.DEFAULTS | {
    'num_key_value_heads': 4,
    'rope_theta': 2_000_000.0,
    'tie_word_embeddings': True,
    'no_rope_layer_interval': 4,
    'use_sliding_window': False,
    'sliding_window': None,
}

param_table = llama.param_table
to_hf = llama.to_hf
from_hf = llama.from_hf
expected_hf_shapes = llama.expected_hf_shapes
unused_hf_tensors = llama.unused_hf_tensors
text_tensor_names = llama.text_tensor_names


def _no_rope_layers(num_layers, interval):
  """SmolLM3's per-layer flags (1: RoPE, 0: NoPE) for a NoPE layer every `interval` layers."""
  return [int(r) for r in rope_layers({'num_layers': num_layers, 'nope_interval': interval})]


def hf_config(model, **kwargs):
  """SmolLM3Config fields (config.json) for a `model` section with nope_interval."""
  config = llama.hf_config(model, **kwargs)
  layers, interval = model['num_layers'], model['nope_interval']
  config.update(
      {
          'architectures': [ARCHITECTURES['smollm3']],
          'model_type': 'smollm3',
          'no_rope_layers': _no_rope_layers(layers, interval),
          'no_rope_layer_interval': interval,
          'use_sliding_window': False,
          'sliding_window': None,
          'layer_types': ['full_attention'] * layers,
      }
  )
  return config


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields of a SmolLM3 config: Llama's, with its NoPE interval."""
  hf = DEFAULTS | hf
  model = llama.model_config_from_hf(hf, where)
  layers = model['num_layers']
  flags = hf.get('no_rope_layers')
  if flags is None:  # as transformers derives it
    flags = _no_rope_layers(layers, positive_int(hf, 'no_rope_layer_interval', where))
  if not isinstance(flags, list) or len(flags) < layers:
    raise HFError(f'{where}: no_rope_layers must be a list of at least {layers} flags (0 or 1)')
  flags = flags[:layers]  # transformers reads the first num_hidden_layers
  model['nope_interval'] = _interval_of(flags, where)
  types = hf.get('layer_types')
  if types is None:  # transformers slides the NoPE layers only
    sliding = hf.get('use_sliding_window') and hf.get('sliding_window') is not None
    types = ['sliding_attention' if sliding and not f else 'full_attention' for f in flags]
  if not isinstance(types, list) or any(t != 'full_attention' for t in types):
    raise HFError(
        f'{where}: sliding windows (layer_types, or use_sliding_window with sliding_window) '
        'are not supported for SmolLM3; euro_lm attends to the full causal context here'
    )
  return model


def _interval_of(flags, where):
  """The N for which `flags` has NoPE (0) exactly in every Nth layer; 0 for none."""
  if any(f not in (0, 1) or isinstance(f, float) for f in flags):
    raise HFError(f'{where}: no_rope_layers={flags!r} must hold 0 (NoPE) and 1 (RoPE) flags')
  first = flags.index(0) + 1 if 0 in flags else 0
  if first and flags != _no_rope_layers(len(flags), first):
    raise HFError(
        f'{where}: no_rope_layers={flags!r} is not supported; euro_lm runs NoPE in every '
        f'Nth layer (model.nope_interval), and this pattern has no such N'
    )
  return first
