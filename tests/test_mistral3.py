"""The language model of Mistral3ForConditionalGeneration folders (Mistral Small 3.1 and
3.2, Magistral Small) in euro_lm, proven against transformers' own multimodal class on text:
random models saved with save_pretrained, as transformers 5 saves them and as the released
folders are (no tie_word_embeddings anywhere, a stored lm_head), give transformers' logits
and greedy tokens after import, and export as a text-only class with the same logits."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from euro_lm import hf
from euro_lm.checkpoint import load_params
from euro_lm.data.tokenizer import load_tokenizer
from euro_lm.hf.check import compare_with_transformers
from tests.hf_tokenizers import make_tokenizer_folder
from tests.test_hf import (
    TOLERANCE,
    abstract_params,
    assert_greedy_equals_transformers,
    euro_logits,
    hf_logits,
    random_tokens,
)

VOCAB = 101
# GQA 2:1 with heads wider than hidden_size / heads (as Mistral Small's 32 x 128 > 5120).
TEXT = dict(
    model_type='mistral',
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=1e6,
    max_position_embeddings=64,
    sliding_window=None,
)
VISION = dict(
    model_type='pixtral',
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=16,
    image_size=28,
    patch_size=14,
)


def quiet(*args):
  del args


def random_model(tied, seed=0, **text):
  config = transformers.Mistral3Config(
      text_config=TEXT | text, vision_config=VISION, tie_word_embeddings=tied
  )
  torch.manual_seed(seed)
  model = transformers.Mistral3ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.3 * torch.randn_like(p) if 'norm' in name else 0.15 * torch.randn_like(p))
  return model


def as_released(folder):
  """The folder's config.json as the released ones have it: no tie_word_embeddings in the
  outer config or the text_config."""
  path = folder / 'config.json'
  config = json.loads(path.read_text())
  config.pop('tie_word_embeddings', None)
  config['text_config'].pop('tie_word_embeddings', None)
  path.write_text(json.dumps(config))


def renamed(folder, prefixes):
  """Rewrites the folder's tensor names: each `prefixes` key that starts a name is replaced
  by its value."""
  path = folder / 'model.safetensors'
  weights = load_file(str(path))
  out = {}
  for name, x in weights.items():
    prefix = next((p for p in prefixes if name.startswith(p)), None)
    out[prefixes[prefix] + name[len(prefix) :] if prefix else name] = x
  save_file(out, str(path), metadata={'format': 'pt'})
  return sorted(out)


def imported(tmp_path, model, layout='saved'):
  """(import result, params, log lines) of `model` saved to a folder: as transformers 5.25
  saves it ('saved': `language_model.model.*`), or with transformers 5's module names
  ('modules': `model.language_model.*`, `lm_head.*`)."""
  folder = tmp_path / 'hf'
  model.save_pretrained(folder)
  if not model.config.tie_word_embeddings:
    as_released(folder)
  if layout == 'modules':
    names = renamed(
        folder,
        {
            'language_model.model.': 'model.language_model.',
            'language_model.lm_head.': 'lm_head.',
            'vision_tower.': 'model.vision_tower.',
            'multi_modal_projector.': 'model.multi_modal_projector.',
        },
    )
    assert 'model.language_model.layers.1.mlp.up_proj.weight' in names
  lines = []
  config = hf.import_hf(str(folder), str(tmp_path / 'run'), log=lines.append)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  return config, params, lines


@pytest.mark.parametrize(
    'tied, layout, window',
    [(False, 'saved', None), (True, 'saved', None), (False, 'modules', 5)],
)
def test_import_matches_transformers(tmp_path, tied, layout, window):
  """Untied as released (transformers runs the stored lm_head), tied as transformers 5
  saves a default Mistral3Config (no lm_head stored), and a window of 5 in the text_config
  (shorter than the 17-token rows) under transformers 5's module names."""
  model = random_model(tied, sliding_window=window)
  config, params, lines = imported(tmp_path, model, layout)
  m = config.model
  assert (m.tie_embeddings, m.sliding_window, m.head_dim, m.num_kv_heads) == (
      tied,
      window or 0,
      16,
      2,
  )
  assert any('skipping' in line and 'vision tower' in line for line in lines), lines
  tokens_BL = random_tokens(VOCAB)
  want = hf_logits(model, tokens_BL)
  assert np.abs(euro_logits(m, params, tokens_BL) - want).max() <= TOLERANCE


def test_greedy_generation_equals_transformers_generate(tmp_path):
  model = random_model(False, seed=3)
  config, params, _ = imported(tmp_path, model)
  assert_greedy_equals_transformers(model, config.model, params)


def test_export_writes_the_language_model_with_the_same_logits(tmp_path):
  """No window: the text model computes what Llama does, and exports as LlamaForCausalLM;
  transformers' logits of the export equal the multimodal model's on text."""
  model = random_model(False, seed=1)
  imported(tmp_path, model)
  hf.export_hf(str(tmp_path / 'run'), str(tmp_path / 'out'), dtype='float32', log=quiet)
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', dtype=torch.float32, attn_implementation='eager'
  ).eval()
  assert type(exported) is transformers.LlamaForCausalLM
  tokens_BL = random_tokens(VOCAB, seed=1)
  assert np.abs(hf_logits(exported, tokens_BL) - hf_logits(model, tokens_BL)).max() <= TOLERANCE


def test_a_folder_with_mistral_smalls_tokenizer_checks_against_transformers(tmp_path):
  """A byte-level tokenizer.json under LlamaTokenizerFast, as Mistral Small 3.x ships it:
  the imported run's ids are AutoTokenizer's on the folder, and `import_hf --check`'s
  comparison loads the folder's own multimodal class."""
  tokenizer_dir = make_tokenizer_folder('llama3', tmp_path / 'tokenizer')
  config_path = tmp_path / 'tokenizer' / 'tokenizer_config.json'
  settings = json.loads(config_path.read_text())
  config_path.write_text(json.dumps(settings | {'tokenizer_class': 'LlamaTokenizerFast'}))
  source = load_tokenizer(tokenizer_dir)
  folder = tmp_path / 'hf'
  config = transformers.Mistral3Config(
      text_config=TEXT | {'vocab_size': source.vocab_size},
      vision_config=VISION,
      tie_word_embeddings=False,
  )
  torch.manual_seed(0)
  transformers.Mistral3ForConditionalGeneration(config).save_pretrained(folder)
  for file in source.files:
    shutil.copy(file, folder)
  hf.import_hf(str(folder), str(tmp_path / 'run'), log=quiet)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  ours = load_tokenizer(str(tmp_path / 'run' / 'tokenizer'))
  for text in ('hello world how are you', 'Grüße aus München!', ' zwei  Leerzeichen'):
    assert ours.encode(text) == theirs(text, add_special_tokens=False)['input_ids'], text
  checked = compare_with_transformers(str(folder), str(tmp_path / 'run'), log=quiet)
  assert checked['max_abs_diff'] <= TOLERANCE and checked['argmax_agreement'] == 1


def test_a_released_config_reads_as_transformers_reads_it():
  """Mistral-Small-3.1-24B's config.json (published), its vision_config abridged."""
  config = {
      'architectures': ['Mistral3ForConditionalGeneration'],
      'model_type': 'mistral3',
      'image_token_index': 10,
      'multimodal_projector_bias': False,
      'projector_hidden_act': 'gelu',
      'spatial_merge_size': 2,
      'text_config': {
          'head_dim': 128,
          'hidden_act': 'silu',
          'hidden_size': 5120,
          'intermediate_size': 32768,
          'max_position_embeddings': 131072,
          'model_type': 'mistral',
          'num_attention_heads': 32,
          'num_hidden_layers': 40,
          'num_key_value_heads': 8,
          'rms_norm_eps': 1e-05,
          'rope_theta': 1000000000.0,
          'sliding_window': None,
          'use_cache': True,
          'vocab_size': 131072,
      },
      'vision_config': {'model_type': 'pixtral', 'hidden_size': 1024, 'head_dim': 64},
      'vision_feature_layer': -1,
  }
  model = hf.model_config_from_hf(config)
  want = transformers.Mistral3Config(**config).text_config
  assert (model['embed_dim'], model['mlp_dim'], model['num_layers'], model['vocab_size']) == (
      want.hidden_size,
      want.intermediate_size,
      want.num_hidden_layers,
      want.vocab_size,
  )
  assert (model['num_heads'], model['num_kv_heads'], model['head_dim']) == (
      want.num_attention_heads,
      want.num_key_value_heads,
      want.head_dim,
  )
  assert model['rope_theta'] == want.rope_parameters['rope_theta'] == 1e9
  assert model['norm_eps'] == want.rms_norm_eps and model['sliding_window'] == 0
  assert model['tie_embeddings'] is False


@pytest.mark.parametrize(
    'change, message',
    [
        (
            {'text_config': TEXT | {'model_type': 'qwen2'}},
            r"config\.json: text_config: model_type='qwen2' is not supported",
        ),
        ({'text_config': None}, r'config\.json: text_config=None must be an object'),
        (
            {'tie_word_embeddings': 'yes'},
            r"config\.json: tie_word_embeddings='yes' must be true or false",
        ),
        (
            {'text_config': TEXT | {'hidden_act': 'gelu'}},
            r"config\.json: text_config: hidden_act='gelu' is not supported",
        ),
    ],
)
def test_unsupported_configs_are_refused(change, message):
  config = {'model_type': 'mistral3', 'text_config': TEXT, 'vision_config': VISION} | change
  with pytest.raises(hf.HFError, match=message):
    hf.model_config_from_hf(config)


def test_a_tied_config_with_another_stored_lm_head_is_refused(tmp_path):
  """transformers 5 runs the stored lm_head of such a folder although its config says tied:
  refused rather than guessed."""
  model = random_model(False)
  model.save_pretrained(tmp_path / 'hf')
  path = tmp_path / 'hf' / 'config.json'
  path.write_text(json.dumps(json.loads(path.read_text()) | {'tie_word_embeddings': True}))
  with pytest.raises(hf.HFError, match=r'tie_word_embeddings=true, but the folder stores an'):
    hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=quiet)
