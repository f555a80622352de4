"""Ministral 3 in and out of euro_lm, proven against transformers' Ministral3ForCausalLM
(and the language model of a Mistral3ForConditionalGeneration folder): YaRN RoPE with Llama
4's query scaling, its original context short enough that the scaling shows within the
test's positions."""

import json

import numpy as np
import pytest
import torch
import transformers

from euro_lm import hf
from euro_lm.checkpoint import load_params
from tests.test_hf import (
    TOLERANCE,
    abstract_params,
    assert_greedy_equals_transformers,
    euro_logits,
    hf_logits,
    random_hf_model,
    random_tokens,
)

YARN = {
    'rope_type': 'yarn',
    'rope_theta': 1_000_000.0,
    'factor': 4.0,
    'original_max_position_embeddings': 4,
    'llama_4_scaling_beta': 0.5,
}
SHAPES = {
    'full': dict(
        family='ministral3',
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters=YARN,
        tie_word_embeddings=False,
    ),
    # A sliding window shorter than the rows, and another original context.
    'window': dict(
        family='ministral3',
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=5,
        rope_parameters=YARN | {'original_max_position_embeddings': 6, 'llama_4_scaling_beta': 0.1},
        tie_word_embeddings=True,
    ),
}


def quiet(*args):
  del args


def imported(tmp_path, shape, seed=0):
  model = random_hf_model(SHAPES[shape], seed=seed)
  model.save_pretrained(tmp_path / 'hf')
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=quiet)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  return model, config, params


@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_import_matches_transformers(tmp_path, shape):
  model, config, params = imported(tmp_path, shape)
  m = config.model
  rope = SHAPES[shape]['rope_parameters']
  assert (m.query_scale_beta, m.rope_original_max_positions) == (
      rope['llama_4_scaling_beta'],
      rope['original_max_position_embeddings'],
  )
  tokens_BL = random_tokens(101)
  want = hf_logits(model, tokens_BL)
  assert np.abs(euro_logits(m, params, tokens_BL) - want).max() <= TOLERANCE
  unscaled = m.copy_and_resolve_references()
  unscaled.query_scale_beta = 0.0
  assert np.abs(euro_logits(unscaled, params, tokens_BL) - want).max() > 1e-2


@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_greedy_generation_equals_transformers_generate(tmp_path, shape):
  model, config, params = imported(tmp_path, shape, seed=3)
  assert_greedy_equals_transformers(model, config.model, params)


def test_export_writes_ministral3_and_imports_again(tmp_path):
  model, config, _ = imported(tmp_path, 'window', seed=1)
  hf.export_hf(str(tmp_path / 'run'), str(tmp_path / 'out'), dtype='float32', log=quiet)
  written = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert (written['model_type'], written['rope_parameters']['llama_4_scaling_beta']) == (
      'ministral3',
      0.1,
  )
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', dtype=torch.float32, attn_implementation='eager'
  ).eval()
  assert type(exported) is transformers.Ministral3ForCausalLM
  tokens_BL = random_tokens(101, seed=1)
  assert np.abs(hf_logits(exported, tokens_BL) - hf_logits(model, tokens_BL)).max() <= TOLERANCE
  again = hf.import_hf(str(tmp_path / 'out'), str(tmp_path / 'again'), log=quiet)
  assert again.model.to_dict() == config.model.to_dict()


def test_a_mistral3_folder_with_a_ministral3_text_model(tmp_path):
  """Ministral 3's releases are Mistral3ForConditionalGeneration folders: the language
  model imports with its query scaling and gives the multimodal class's text logits."""
  text = {k: v for k, v in SHAPES['full'].items() if k != 'family'}
  vision = dict(
      model_type='pixtral',
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      head_dim=16,
      image_size=28,
      patch_size=14,
  )
  config = transformers.Mistral3Config(
      text_config=text | {'model_type': 'ministral3', 'vocab_size': 101},
      vision_config=vision,
      tie_word_embeddings=False,
  )
  torch.manual_seed(0)
  model = transformers.Mistral3ForConditionalGeneration(config).eval()
  model.save_pretrained(tmp_path / 'hf')
  imported_config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=quiet)
  assert imported_config.model.query_scale_beta == 0.5
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(imported_config.model))
  tokens_BL = random_tokens(101)
  got = euro_logits(imported_config.model, params, tokens_BL)
  assert np.abs(got - hf_logits(model, tokens_BL)).max() <= TOLERANCE


def test_a_config_without_rope_parameters_takes_ministral3s_defaults():
  """Ministral3Config's own YaRN (factor 16 over 16384, beta 0.1) where config.json names
  none; a scaling without llama_4_scaling_beta is refused, as transformers cannot run it."""
  model = hf.model_config_from_hf({'model_type': 'ministral3'})
  want = transformers.Ministral3Config().rope_parameters
  assert (model['rope_scaling'], model['rope_scaling_factor']) == ('yarn', want['factor'])
  assert model['rope_original_max_positions'] == want['original_max_position_embeddings']
  assert model['query_scale_beta'] == want['llama_4_scaling_beta']
  assert model['rope_attention_factor'] == 1.0  # mscale over mscale_all_dim, both 1
  yarn = {k: v for k, v in YARN.items() if k != 'llama_4_scaling_beta'}
  with pytest.raises(hf.HFError, match=r'rope_parameters: Ministral 3 needs llama_4_scaling_beta'):
    hf.model_config_from_hf({'model_type': 'ministral3', 'rope_parameters': yarn})
