"""Gemma 2 in and out of euro_lm, proven against transformers' Gemma2ForCausalLM: random
models saved with save_pretrained (and as the released config.json has them, without
layer_types) give transformers' logits and greedy tokens after import, train with the
fused loss, export as Gemma2ForCausalLM and import again."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from euro_lm import hf
from euro_lm.checkpoint import load_params
from euro_lm.config import validate
from euro_lm.errors import ConfigError
from euro_lm.hf.check import compare_with_transformers
from tests.test_gemma3 import import_train_and_export
from tests.test_hf import (
    TOLERANCE,
    abstract_params,
    assert_greedy_equals_transformers,
    euro_logits,
    hf_logits,
    random_hf_model,
    random_tokens,
)

# Local and global layers alternating (transformers' default), a window of 5 (shorter than
# the 17-token test rows), a query scale that is not head_dim, and caps below the scores'
# and logits' size, so that each one changes the logits.
ALTERNATING = dict(
    family='gemma2',
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=5,
    attn_logit_softcapping=1.0,
    final_logit_softcapping=3.0,
    tie_word_embeddings=True,
)
# Three layers, untied, GQA 4:1, linear RoPE scaling, transformers' default caps (50 and
# 30) and query_pre_attn_scalar (256, not head_dim 16).
UNTIED = dict(
    family='gemma2',
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=4,
    rope_parameters={'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 5000.0},
    tie_word_embeddings=False,
)
SHAPES = {'alternating': ALTERNATING, 'untied': UNTIED}


def quiet(*args):
  del args


def imported(tmp_path, shape, seed=0, released=False):
  """(transformers model, import result, params). `released`: the folder's config.json
  without layer_types, as Google's (transformers 4.42) has it."""
  model = random_hf_model(SHAPES[shape], seed=seed)
  model.save_pretrained(tmp_path / 'hf')
  if released:
    path = tmp_path / 'hf' / 'config.json'
    config = json.loads(path.read_text())
    del config['layer_types']
    path.write_text(json.dumps(config))
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=quiet)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  return model, config, params


@pytest.mark.parametrize('shape,released', [('alternating', True), ('untied', False)])
def test_import_matches_transformers(tmp_path, shape, released):
  model, config, params = imported(tmp_path, shape, released=released)
  m, theirs = config.model, model.config
  assert (m.norm_plus_one, m.post_norms, m.scale_embeddings, m.qk_norm) == (True,) * 3 + (False,)
  assert (m.attn_logit_softcap, m.final_logit_softcap) == (
      theirs.attn_logit_softcapping,
      theirs.final_logit_softcapping,
  )
  assert m.query_pre_attn_scalar == theirs.query_pre_attn_scalar
  local = [t == 'sliding_attention' for t in theirs.layer_types]
  assert [(i + 1) % m.sliding_window_pattern != 0 for i in range(m.num_layers)] == local
  tokens_BL = random_tokens(101)
  want = hf_logits(model, tokens_BL)
  assert np.abs(euro_logits(m, params, tokens_BL) - want).max() <= TOLERANCE
  # The window and, below the scores' and logits' size, each cap matter on these rows:
  # without one the logits differ.
  small_caps = ('attn_logit_softcap', 'final_logit_softcap') if shape == 'alternating' else ()
  for field in ('sliding_window',) + small_caps:
    changed = m.copy_and_resolve_references()
    changed[field] = 0
    assert np.abs(euro_logits(changed, params, tokens_BL) - want).max() > 1e-2, field


@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_greedy_generation_equals_transformers_generate(tmp_path, shape):
  """18 positions, past the window: the KV cache caps the scores and the logits."""
  model, config, params = imported(tmp_path, shape, seed=3)
  assert_greedy_equals_transformers(model, config.model, params)


def test_released_configs_leave_fields_at_transformers_defaults():
  """gemma-2-27b's config.json (published) fields, less those at Gemma2Config's defaults:
  the caps, window and layer pattern come from transformers' defaults."""
  config = {
      'architectures': ['Gemma2ForCausalLM'],
      'model_type': 'gemma2',
      'hidden_size': 4608,
      'intermediate_size': 36864,
      'num_hidden_layers': 46,
      'num_attention_heads': 32,
      'num_key_value_heads': 16,
      'head_dim': 128,
      'query_pre_attn_scalar': 144,
  }
  model = hf.model_config_from_hf(config)
  want = transformers.Gemma2Config(**config)
  assert (model['attn_logit_softcap'], model['final_logit_softcap']) == (50.0, 30.0)
  assert model['attn_logit_softcap'] == want.attn_logit_softcapping
  assert model['final_logit_softcap'] == want.final_logit_softcapping
  assert (model['vocab_size'], model['sliding_window'], model['rope_theta']) == (
      want.vocab_size,
      want.sliding_window,
      want.rope_parameters['rope_theta'],
  )
  local = [(i + 1) % model['sliding_window_pattern'] != 0 for i in range(46)]
  assert local == [t == 'sliding_attention' for t in want.layer_types]
  assert model['query_pre_attn_scalar'] == 144 and model['tie_embeddings']


def test_import_train_export_and_import_again(tmp_path):
  """With a Gemma-shaped tokenizer: import, 2 training steps with the fused loss (which caps
  the logits), export (transformers loads Gemma2ForCausalLM with the trained logits), and
  the export imported again gives the trained parameters exactly."""
  config, workdir, output = import_train_and_export(
      tmp_path, ALTERNATING, **{'model.loss_chunk_length': 8}
  )
  written = json.loads((output / 'config.json').read_text())
  assert (written['architectures'], written['model_type']) == (['Gemma2ForCausalLM'], 'gemma2')
  assert (written['attn_logit_softcapping'], written['final_logit_softcapping']) == (1.0, 3.0)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
  assert type(theirs) is transformers.Gemma2ForCausalLM
  exported_check = compare_with_transformers(str(output), str(workdir), log=quiet)
  assert exported_check['max_abs_diff'] < TOLERANCE and exported_check['argmax_agreement'] == 1

  again = hf.import_hf(str(output), str(tmp_path / 'again'), log=quiet)
  assert again.model.to_dict() == {**config.model.to_dict(), 'loss_chunk_length': 0}
  trained, _ = load_params(str(workdir), abstract_params(config.model))
  reimported, _ = load_params(str(tmp_path / 'again'), abstract_params(again.model))
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(reimported)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('attn_logit_softcapping', 0, r'attn_logit_softcapping=0 must be a positive number'),
        ('final_logit_softcapping', 'x', r"final_logit_softcapping='x' must be a positive"),
        ('hidden_activation', 'gelu', r"hidden_activation='gelu' is not supported; Gemma 2's"),
        ('sliding_window', None, r'sliding_window=null with sliding_attention layers'),
        (
            'layer_types',
            ['full_attention', 'sliding_attention', 'sliding_attention', 'full_attention'],
            r'layer_types=\[.*\] is not supported; euro_lm supports every Nth layer',
        ),
        (
            'rope_parameters',
            {'rope_type': 'dynamic', 'factor': 2.0},
            r"rope_parameters\.rope_type='dynamic' is not",
        ),
    ],
)
def test_unsupported_config_fields_are_refused(field, value, message):
  shape = {k: v for k, v in ALTERNATING.items() if k != 'family'}
  config = transformers.Gemma2Config(**shape).to_dict() | {field: value}
  with pytest.raises(hf.HFError, match=r'config\.json: ' + message):
    hf.model_config_from_hf(config)


def test_soft_capping_runs_on_the_attentions_that_cap():
  """An imported Gemma 2 validates with xla and every pallas kernel set (they all cap);
  naming cuDNN is one error naming the fields."""
  from configs import tiny

  c = tiny.get_config()
  # head_dim 128, as Gemma 2 27B's: the Hopper kernels take 64 or 128 (2B and 9B have 256)
  gemma2 = transformers.Gemma2Config(num_hidden_layers=2, head_dim=128)
  c.model.update(hf.model_config_from_hf(gemma2.to_dict()))
  c.model.compute_dtype = 'bfloat16'
  for impl in ('xla', 'pallas', 'auto'):
    c.model.attention_impl = impl
    validate(c, 1)
  c.model.attention_impl = 'pallas'
  for backend in ('gpu', 'tpu', 'mosaic_gpu'):
    c.model.pallas_backend = backend
    validate(c, 1)
  c.model.attention_impl = 'cudnn'
  with pytest.raises(ConfigError, match=r"attention_impl='cudnn' does not soft-cap .*50\.0"):
    validate(c, 1)


def test_export_chooses_gemma_2_or_3_and_refuses_the_rest():
  from tests.test_gemma3 import gemma_model

  gemma3 = gemma_model().to_dict()
  gemma2 = gemma3 | {'qk_norm': False, 'rope_local_theta': 0.0, 'attn_logit_softcap': 50.0}
  assert hf.architectures.for_model(gemma3) is hf.gemma3
  assert hf.architectures.for_model(gemma2) is hf.gemma2
  # Gemma 2 has one RoPE base for every layer.
  with pytest.raises(hf.HFError, match=r'model\.rope_local_theta=1000\.0 .*Gemma 2 needs'):
    hf.architectures.for_model(gemma2 | {'rope_local_theta': 1000.0})
  # A cap on a Llama-like model is no architecture.
  from configs import tiny

  plain = tiny.get_config().model.to_dict() | {'final_logit_softcap': 30.0}
  with pytest.raises(hf.HFError, match=r'model\.norm_plus_one=False, .*Gemma needs'):
    hf.architectures.for_model(plain)
