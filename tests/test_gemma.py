"""Gemma (the first generation) in and out of euro_lm, proven against transformers'
GemmaForCausalLM: random models saved with save_pretrained (and with the released
config.json's `hidden_act: "gelu"`) give transformers' logits and greedy tokens after
import, train, export as GemmaForCausalLM and import again."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from euro_lm import hf
from euro_lm.checkpoint import load_params
from tests.test_gemma3 import gemma_model
from tests.test_hf import (
    TOLERANCE,
    abstract_params,
    assert_greedy_equals_transformers,
    euro_logits,
    hf_logits,
    random_hf_model,
    random_tokens,
)

# Multi-query attention and tied embeddings, as gemma-2b has them.
MQA = dict(
    family='gemma',
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    tie_word_embeddings=True,
)
# Untied, heads * head_dim wider than hidden_size (as gemma-7b's 16 * 256 > 3072), GQA 2:1
# and linear RoPE scaling.
WIDE_HEADS = dict(
    family='gemma',
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_parameters={'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 5000.0},
    tie_word_embeddings=False,
)
SHAPES = {'mqa': MQA, 'wide_heads': WIDE_HEADS}


def quiet(*args):
  del args


def imported(tmp_path, shape, seed=0, released=False):
  """(transformers model as loaded from the folder, import result, params). `released`:
  the folder's config.json names the activation as Google's gemma-2b and gemma-7b do
  (`hidden_act: "gelu"`, no hidden_activation)."""
  random_hf_model(SHAPES[shape], seed=seed).save_pretrained(tmp_path / 'hf')
  if released:
    path = tmp_path / 'hf' / 'config.json'
    config = json.loads(path.read_text())
    config.pop('hidden_activation', None)
    path.write_text(json.dumps(config | {'hidden_act': 'gelu'}))
  model = transformers.GemmaForCausalLM.from_pretrained(
      tmp_path / 'hf', dtype=torch.float32, attn_implementation='eager'
  ).eval()
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=quiet)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  return model, config, params


@pytest.mark.parametrize('shape,released', [('mqa', True), ('wide_heads', False)])
def test_import_matches_transformers(tmp_path, shape, released):
  model, config, params = imported(tmp_path, shape, released=released)
  m = config.model
  assert (m.norm_plus_one, m.scale_embeddings, m.mlp_activation) == (True, True, 'gelu_tanh')
  assert not (m.post_norms or m.qk_norm or m.sliding_window or m.query_pre_attn_scalar)
  assert model.config.hidden_act == 'gelu_pytorch_tanh'  # transformers' reading of 'gelu'
  tokens_BL = random_tokens(101)
  want = hf_logits(model, tokens_BL)
  assert np.abs(euro_logits(m, params, tokens_BL) - want).max() <= TOLERANCE
  # The (1 + w) norms and the embedding scale matter on these rows.
  for field in ('norm_plus_one', 'scale_embeddings'):
    changed = m.copy_and_resolve_references()
    changed[field] = False
    assert np.abs(euro_logits(changed, params, tokens_BL) - want).max() > 1e-2, field


@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_greedy_generation_equals_transformers_generate(tmp_path, shape):
  model, config, params = imported(tmp_path, shape, seed=3)
  assert_greedy_equals_transformers(model, config.model, params)


def test_released_configs_leave_fields_at_transformers_defaults():
  """gemma-7b's config.json (published) fields, less those at GemmaConfig's defaults."""
  config = {
      'architectures': ['GemmaForCausalLM'],
      'model_type': 'gemma',
      'hidden_act': 'gelu',
      'rope_scaling': None,
      'rope_theta': 10000.0,
      'max_position_embeddings': 8192,
  }
  model = hf.model_config_from_hf(config)
  want = transformers.GemmaConfig(**config)
  assert (model['vocab_size'], model['embed_dim'], model['mlp_dim'], model['num_layers']) == (
      want.vocab_size,
      want.hidden_size,
      want.intermediate_size,
      want.num_hidden_layers,
  )
  assert (model['num_heads'], model['num_kv_heads'], model['head_dim']) == (
      want.num_attention_heads,
      want.num_key_value_heads,
      want.head_dim,
  )
  assert model['rope_theta'] == want.rope_parameters['rope_theta']
  assert model['norm_eps'] == want.rms_norm_eps and model['tie_embeddings']


def test_export_and_import_again(tmp_path):
  """Export (transformers loads GemmaForCausalLM with euro_lm's logits: the released
  activation written as both versions read it), and the export imported again gives the
  parameters exactly. Training an imported Gemma-family model is `test_gemma2`'s and
  `test_gemma3`'s: the same layers with more of them."""
  _, config, params = imported(tmp_path, 'wide_heads', released=True)
  output = tmp_path / 'export'
  hf.export_hf(str(tmp_path / 'run'), str(output), dtype='float32', log=quiet)
  written = json.loads((output / 'config.json').read_text())
  assert (written['architectures'], written['model_type']) == (['GemmaForCausalLM'], 'gemma')
  assert written['hidden_act'] == written['hidden_activation'] == 'gelu_pytorch_tanh'
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      output, dtype=torch.float32, attn_implementation='eager'
  ).eval()
  assert type(theirs) is transformers.GemmaForCausalLM
  tokens_BL = random_tokens(101, seed=2)
  assert np.abs(
      hf_logits(theirs, tokens_BL) - euro_logits(config.model, params, tokens_BL)
  ).max() <= (TOLERANCE)
  again = hf.import_hf(str(output), str(tmp_path / 'again'), log=quiet)
  assert again.model.to_dict() == config.model.to_dict()
  reimported, _ = load_params(str(tmp_path / 'again'), abstract_params(again.model))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reimported)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('hidden_act', 'silu', r"hidden_act='silu' is not supported; this family uses 'gelu_"),
        ('hidden_activation', 'gelu', r"hidden_activation='gelu' is not supported; Gemma's"),
        ('attention_bias', True, r'attention_bias=true is not supported'),
        ('use_bidirectional_attention', True, r'use_bidirectional_attention=true is not'),
        (
            'rope_parameters',
            {'rope_type': 'dynamic', 'factor': 2.0},
            r"rope_parameters\.rope_type='dynamic' is not",
        ),
    ],
)
def test_unsupported_config_fields_are_refused(field, value, message):
  shape = {k: v for k, v in MQA.items() if k != 'family'}
  config = transformers.GemmaConfig(**shape).to_dict() | {field: value}
  with pytest.raises(hf.HFError, match=r'config\.json: ' + message):
    hf.model_config_from_hf(config)


def test_export_chooses_the_gemma_generation_and_refuses_the_rest():
  gemma3 = gemma_model().to_dict()
  gemma2 = gemma3 | {'qk_norm': False, 'rope_local_theta': 0.0, 'attn_logit_softcap': 50.0}
  gemma = gemma2 | {
      'post_norms': False,
      'attn_logit_softcap': 0.0,
      'query_pre_attn_scalar': 0,
      'sliding_window': 0,
      'sliding_window_pattern': 0,
  }
  assert [hf.architectures.for_model(m) for m in (gemma, gemma2, gemma3)] == [
      hf.gemma,
      hf.gemma2,
      hf.gemma3,
  ]
  # What Gemma 2 adds, without its norms after attention and the MLP, is no architecture.
  for field, value in (('attn_logit_softcap', 50.0), ('sliding_window', 24)):
    with pytest.raises(hf.HFError, match=rf'model\.{field}={value} .*Gemma needs'):
      hf.architectures.for_model(gemma | {field: value})
  # Gemma's norms after attention and the MLP make it a Gemma 2, which needs its windows.
  with pytest.raises(hf.HFError, match=r'sliding_window=0 with sliding_attention layers \(every'):
    hf.architectures.for_model(gemma | {'post_norms': True})
