"""Gemma 3 (text) in and out of euro_lm, proven against transformers' Gemma3ForCausalLM and
Gemma3ForConditionalGeneration: random models saved with save_pretrained give transformers'
logits and greedy tokens after import, train, export as Gemma3ForCausalLM and import again."""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from configs import tiny
from euro_lm import hf
from euro_lm.checkpoint import load_params
from euro_lm.config import validate
from euro_lm.data.tokenizer import load_tokenizer
from euro_lm.errors import ConfigError
from euro_lm.hf.check import compare_with_transformers
from euro_lm.model import Decoder, forward_flops_per_token
from euro_lm.model.layers import RMSNorm, geglu, rope_attention_factor, rope_frequencies
from euro_lm.train.loop import train
from tests.hf_tokenizers import make_tokenizer_folder
from tests.test_hf import (
    TOLERANCE,
    abstract_params,
    assert_greedy_equals_transformers,
    euro_logits,
    hf_logits,
    random_hf_model,
    random_tokens,
)

# Global layer 2 of 4 (sliding_window_pattern 3) between local ones with a window of 5
# (shorter than the 17-token test rows), a query scale that is not head_dim, linear RoPE
# scaling on the global layer only and another base on the local ones.
LOCAL_GLOBAL = dict(
    family='gemma3_text',
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=5,
    sliding_window_pattern=3,
    tie_word_embeddings=True,
    rope_parameters={
        'full_attention': {'rope_type': 'linear', 'factor': 4.0, 'rope_theta': 50_000.0},
        'sliding_attention': {'rope_type': 'default', 'rope_theta': 777.0},
    },
)
# Two layers, both local (transformers' default pattern of 6), untied, GQA 4:1, the default
# query_pre_attn_scalar (256, not head_dim 16) and RoPE bases, and soft-capped logits
# (Gemma3TextConfig's final_logit_softcapping, null by default).
ALL_LOCAL = dict(
    family='gemma3_text',
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=4,
    tie_word_embeddings=False,
    final_logit_softcapping=4.0,
)
SHAPES = {'local_global': LOCAL_GLOBAL, 'all_local': ALL_LOCAL}


def quiet(*args):
  del args


def imported(tmp_path, shape, seed=0):
  model = random_hf_model(SHAPES[shape], seed=seed)
  model.save_pretrained(tmp_path / 'hf')
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=quiet)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  return model, config, params


# ----------------------------------------------------------------------------- layers


def test_norm_and_geglu_equal_transformers_modules():
  from transformers.activations import ACT2FN
  from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 24)).astype(np.float32) * 3
  theirs = Gemma3RMSNorm(24, eps=1e-6)
  with torch.no_grad():
    theirs.weight.copy_(torch.randn(24) * 0.5)
    want = theirs(torch.tensor(x)).numpy()
  ours = RMSNorm(1e-6, plus_one=True)
  assert not np.asarray(ours.init(jax.random.key(0), x)['params']['scale'].value).any()  # 1 + 0
  got = ours.apply({'params': {'scale': theirs.weight.detach().numpy()}}, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  gate, up = (rng.standard_normal((3, 7)).astype(np.float32) * 3 for _ in range(2))
  want = (ACT2FN['gelu_pytorch_tanh'](torch.tensor(gate)) * torch.tensor(up)).numpy()
  np.testing.assert_allclose(geglu(gate, up), want, rtol=1e-5, atol=1e-5)
  plain = lambda g, u: jax.nn.gelu(g, approximate=True) * u  # noqa: E731
  w = rng.standard_normal(gate.shape).astype(np.float32)
  grads = lambda f: jax.grad(lambda g, u: jnp.sum(f(g, u) * w), argnums=(0, 1))(gate, up)  # noqa: E731
  for a, b in zip(grads(geglu), grads(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_import_matches_transformers(tmp_path, shape):
  model, config, params = imported(tmp_path, shape)
  m, hf_config = config.model, model.config
  assert (m.norm_plus_one, m.post_norms, m.scale_embeddings, m.qk_norm) == (True,) * 4
  assert (m.mlp_activation, m.head_dim) == ('gelu_tanh', 16)
  assert m.query_pre_attn_scalar == hf_config.query_pre_attn_scalar
  assert m.sliding_window == hf_config.sliding_window
  assert m.tie_embeddings == hf_config.tie_word_embeddings
  local = [t == 'sliding_attention' for t in hf_config.layer_types]
  assert [not ((i + 1) % m.sliding_window_pattern == 0) for i in range(m.num_layers)] == local
  rope = hf_config.rope_parameters
  assert m.rope_theta == rope['full_attention']['rope_theta']
  assert m.rope_local_theta == rope['sliding_attention']['rope_theta']
  tokens_BL = random_tokens(101)
  want = hf_logits(model, tokens_BL)
  got = euro_logits(m, params, tokens_BL)
  assert np.abs(got - want).max() <= TOLERANCE
  # The window matters on these rows: without it the logits differ.
  unwindowed = m.copy_and_resolve_references()
  unwindowed.sliding_window = 0
  unwindowed = euro_logits(unwindowed, params, tokens_BL)
  assert np.abs(unwindowed - want).max() > 1e-2


@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_greedy_generation_equals_transformers_generate(tmp_path, shape):
  """18 positions, past the window: the KV cache applies each layer's window and RoPE."""
  model, config, params = imported(tmp_path, shape, seed=3)
  assert_greedy_equals_transformers(model, config.model, params)


def test_multimodal_folder_imports_its_language_model(tmp_path):
  """Gemma3ForConditionalGeneration as transformers 5 saves it (`model.language_model.*`)
  and as the released checkpoints store it (`language_model.model.*`): the vision tower
  is skipped, the text logits are transformers', and export writes Gemma3ForCausalLM."""
  text = {k: v for k, v in LOCAL_GLOBAL.items() if k != 'family'}
  config = transformers.Gemma3Config(
      text_config=dict(text, vocab_size=101, max_position_embeddings=64),
      vision_config=dict(
          hidden_size=16,
          intermediate_size=32,
          num_hidden_layers=1,
          num_attention_heads=2,
          image_size=28,
          patch_size=14,
      ),
      mm_tokens_per_image=4,
      image_token_index=100,
      boi_token_index=98,
      eoi_token_index=99,
  )
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.3 * torch.randn_like(p) if 'norm' in name else 0.15 * torch.randn_like(p))
  model.save_pretrained(tmp_path / 'new')
  tokens_BL = random_tokens(98)  # no image tokens
  want = hf_logits(model, tokens_BL)

  released = tmp_path / 'released'
  shutil.copytree(tmp_path / 'new', released)
  weights = load_file(str(released / 'model.safetensors'))
  old = {'model.language_model.': 'language_model.model.', 'model.vision_tower.': 'vision_tower.'}
  renamed = {}
  for name, x in weights.items():
    prefix = next((p for p in old if name.startswith(p)), None)
    renamed[old[prefix] + name[len(prefix) :] if prefix else name] = x
  assert any(n.startswith('language_model.model.layers.3.') for n in renamed)
  save_file(renamed, str(released / 'model.safetensors'), metadata={'format': 'pt'})

  for folder in ('new', 'released'):
    lines = []
    result = hf.import_hf(str(tmp_path / folder), str(tmp_path / f'{folder}_run'), log=lines.append)
    assert any('skipping' in line and 'vision tower' in line for line in lines), lines
    params, _ = load_params(str(tmp_path / f'{folder}_run'), abstract_params(result.model))
    assert np.abs(euro_logits(result.model, params, tokens_BL) - want).max() <= TOLERANCE

  hf.export_hf(str(tmp_path / 'new_run'), str(tmp_path / 'out'), dtype='float32', log=quiet)
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', dtype=torch.float32, attn_implementation='eager'
  ).eval()
  assert type(exported) is transformers.Gemma3ForCausalLM
  assert np.abs(hf_logits(exported, tokens_BL) - want).max() <= TOLERANCE


def test_a_released_multimodal_config_leaves_fields_at_transformers_defaults():
  """gemma-3-4b's config.json (published) names six text fields; the rest are defaults."""
  config = {
      'architectures': ['Gemma3ForConditionalGeneration'],
      'model_type': 'gemma3',
      'text_config': {
          'hidden_size': 2560,
          'intermediate_size': 10240,
          'model_type': 'gemma3_text',
          'num_hidden_layers': 34,
          'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
          'sliding_window': 1024,
      },
      'vision_config': {'model_type': 'siglip_vision_model'},
  }
  model = hf.model_config_from_hf(config)
  want = transformers.Gemma3Config(**config).text_config
  assert (model['num_heads'], model['num_kv_heads'], model['head_dim']) == (8, 4, 256)
  assert (model['vocab_size'], model['num_layers'], model['sliding_window']) == (262_208, 34, 1024)
  assert (model['rope_scaling'], model['rope_scaling_factor']) == ('linear', 8.0)
  rope = want.rope_parameters
  assert model['rope_theta'] == rope['full_attention']['rope_theta'] == 1e6
  assert model['rope_local_theta'] == rope['sliding_attention']['rope_theta'] == 1e4
  assert model['query_pre_attn_scalar'] == want.query_pre_attn_scalar == 256
  local = [(i + 1) % model['sliding_window_pattern'] != 0 for i in range(34)]
  assert local == [t == 'sliding_attention' for t in want.layer_types]


# ------------------------------------------------------------------ train and export


def import_train_and_export(tmp_path, hf_shape, vocab_padding=0, **overrides):
  """A random HF folder of `hf_shape` with a Gemma-shaped tokenizer (and `vocab_padding`
  embedding rows more) imported, trained 2 steps with the `overrides` ('model.x': value)
  and exported in float32: (the import's config, the run's workdir, the export folder)."""
  tokenizer_dir = make_tokenizer_folder('gemma', tmp_path / 'tokenizer')
  source = load_tokenizer(tokenizer_dir)
  hf_dir = tmp_path / 'hf'
  vocab_size = source.vocab_size + vocab_padding
  random_hf_model({**hf_shape, 'vocab_size': vocab_size}).save_pretrained(hf_dir)
  for file in source.files:
    shutil.copy(file, hf_dir)
  config = hf.import_hf(str(hf_dir), str(tmp_path / 'imported'), log=quiet)
  config.update_from_flattened_dict(
      {
          'train.steps': 2,
          'train.global_batch_size': 8,
          'train.eval_batches': 1,
          'train.seq_len': 32,
          'train.log_every': 1,
          'train.eval_every': 0,
          'train.checkpoint_every': 2,
          'data.languages': 'deu_Latn,fra_Latn',
          **overrides,
      }
  )
  workdir = tmp_path / 'run'
  train(config, str(workdir))
  output = tmp_path / 'export'
  hf.export_hf(str(workdir), str(output), dtype='float32', log=quiet)
  return config, workdir, output


def test_import_train_export_and_import_again(tmp_path):
  """With a Gemma-shaped tokenizer and a padded vocabulary: import, 2 training steps,
  export (transformers loads Gemma3ForCausalLM with the trained logits), and the export
  imported again gives the trained parameters exactly."""
  config, workdir, output = import_train_and_export(tmp_path, LOCAL_GLOBAL, vocab_padding=5)
  assert config.data.add_bos and config.data.tokenizer_path
  written = json.loads((output / 'config.json').read_text())
  assert (written['architectures'], written['model_type']) == (['Gemma3ForCausalLM'], 'gemma3_text')
  theirs = transformers.AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
  assert type(theirs) is transformers.Gemma3ForCausalLM
  assert theirs.config.layer_types == [
      'sliding_attention',
      'sliding_attention',
      'full_attention',
      'sliding_attention',
  ]
  exported_check = compare_with_transformers(str(output), str(workdir), log=quiet)
  assert exported_check['max_abs_diff'] < TOLERANCE and exported_check['argmax_agreement'] == 1

  again = hf.import_hf(str(output), str(tmp_path / 'again'), log=quiet)
  assert again.model.to_dict() == {**config.model.to_dict()}
  trained, _ = load_params(str(workdir), abstract_params(config.model))
  reimported, _ = load_params(str(tmp_path / 'again'), abstract_params(again.model))
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(reimported)):
    np.testing.assert_array_equal(a, b)
  before, _ = load_params(str(tmp_path / 'imported'), abstract_params(config.model))
  assert not np.array_equal(
      before['layers']['mlp_out_norm']['scale'], trained['layers']['mlp_out_norm']['scale']
  )


# ------------------------------------------------------------------------- the model


def gemma_model(**overrides):
  m = tiny.get_config().model
  m.update(
      vocab_size=97,
      num_layers=3,
      embed_dim=32,
      mlp_dim=48,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      qk_norm=True,
      norm_plus_one=True,
      post_norms=True,
      scale_embeddings=True,
      mlp_activation='gelu_tanh',
      query_pre_attn_scalar=24,
      sliding_window=24,
      sliding_window_pattern=2,
      rope_local_theta=1000.0,
  )
  m.update(overrides)
  return m


def test_pallas_and_remat_take_the_per_layer_windows():
  """The local/global `lax.cond` with the pallas kernels (interpreted) gives the xla
  logits, and rematerialised gradients equal plain ones."""
  tokens = jax.random.randint(jax.random.key(1), (1, 128), 0, 97)
  model = Decoder(gemma_model(num_layers=2))  # a local layer, then a global one
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  xla = jax.jit(model.apply)({'params': params}, tokens)
  pallas = Decoder(gemma_model(num_layers=2, attention_impl='pallas'))
  np.testing.assert_allclose(
      jax.jit(pallas.apply)({'params': params}, tokens), xla, atol=2e-4, rtol=2e-4
  )

  def grads(policy):
    decoder = Decoder(gemma_model(num_layers=2, sliding_window=6, remat_policy=policy))
    loss = lambda p: jnp.mean(decoder.apply({'params': p}, tokens[:, :16]) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(jax.tree.leaves(grads('none')), jax.tree.leaves(grads('dots'))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_flops_count_the_local_layers_window():
  full = forward_flops_per_token(gemma_model(sliding_window=0), 128)
  windowed = forward_flops_per_token(gemma_model(), 128)
  # Layers 0 and 2 of 3 are local: each sees 24 - 24^2/256 keys per query instead of 64.
  assert full - windowed == 2 * 4 * 4 * 16 * (64 - (24 - 24**2 / 256))


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    'field, value, message',
    [
        (
            'attn_logit_softcapping',
            50.0,
            r"attn_logit_softcapping=50\.0 is not supported: transformers' .* does not apply",
        ),
        ('hidden_activation', 'gelu', r"hidden_activation='gelu' is not supported"),
        ('use_bidirectional_attention', True, r'use_bidirectional_attention=true'),
        ('sliding_window', 0, r'sliding_window=0 must be a positive integer'),
        ('sliding_window', None, r'sliding_window=null with sliding_attention layers'),
        ('num_key_value_heads', 0, r'num_key_value_heads=0 must be a positive integer'),
        ('head_dim', 'x', r"head_dim='x' must be a positive integer"),
        ('tie_word_embeddings', 1, r'tie_word_embeddings=1 must be true or false'),
        (
            'layer_types',
            ['full_attention', 'sliding_attention', 'sliding_attention', 'full_attention'],
            r'layer_types=\[.*\] is not supported; euro_lm supports every Nth layer',
        ),
        (
            'rope_parameters',
            {'sliding_attention': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4}},
            r"rope_parameters\.sliding_attention\.rope_type='linear' is not supported",
        ),
    ],
)
def test_unsupported_config_fields_are_refused(field, value, message):
  shape = {k: v for k, v in LOCAL_GLOBAL.items() if k != 'family'}
  config = transformers.Gemma3TextConfig(**shape).to_dict() | {field: value}
  with pytest.raises(hf.HFError, match=r'config\.json: ' + message):
    hf.model_config_from_hf(config)
  multimodal = {'model_type': 'gemma3', 'text_config': config}
  with pytest.raises(hf.HFError, match=r'config\.json: text_config: ' + message):
    hf.model_config_from_hf(multimodal)


def test_caps_transformers_would_not_apply_are_refused():
  """transformers' Gemma 3 never caps the attention scores, and its multimodal class never
  caps the logits (Gemma3ForCausalLM does): importing either would change the logits."""
  text = {k: v for k, v in LOCAL_GLOBAL.items() if k != 'family'}
  capped = transformers.Gemma3TextConfig(**text, final_logit_softcapping=30.0).to_dict()
  assert hf.model_config_from_hf(capped)['final_logit_softcap'] == 30.0
  with pytest.raises(hf.HFError, match=r'final_logit_softcapping=-1\.0 must be a positive'):
    hf.model_config_from_hf(capped | {'final_logit_softcapping': -1.0})
  multimodal = {
      'model_type': 'gemma3',
      'architectures': ['Gemma3ForConditionalGeneration'],
      'text_config': capped,
  }
  with pytest.raises(
      hf.HFError,
      match=r'text_config: final_logit_softcapping=30\.0 is not supported: transformers\' '
      r'Gemma3ForConditionalGeneration does not apply it',
  ):
    hf.model_config_from_hf(multimodal)


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'model.mlp_activation': 'relu'}, r"model\.mlp_activation='relu' is not one of"),
        ({'model.sliding_window_pattern': -1}, r'model\.sliding_window_pattern=-1 must be >= 0'),
        ({'model.query_pre_attn_scalar': -1}, r'model\.query_pre_attn_scalar=-1 must be >= 0'),
        (
            {'model.rope_local_theta': 1e4},
            r'model\.rope_local_theta=10000\.0 needs model\.sliding_',
        ),
    ],
)
def test_validate_names_the_field(overrides, message):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    validate(config, 1)


def test_yarn_on_the_global_layers_truncates_as_transformers_does():
  """transformers reads YaRN's truncate beside the layer types, never in full_attention's
  parameters, so a Gemma 3 always truncates: import reads it so, export refuses less, and
  the original context is max_position_embeddings where full_attention's leaves it out."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  text = {k: v for k, v in LOCAL_GLOBAL.items() if k != 'family'}
  yarn = {'rope_type': 'yarn', 'rope_theta': 100.0, 'factor': 4.0, 'truncate': False}
  text['rope_parameters'] = dict(text['rope_parameters'], full_attention=yarn)
  config = {'model_type': 'gemma3_text', 'vocab_size': 101, 'max_position_embeddings': 32} | text
  model = hf.model_config_from_hf(config)
  assert model['rope_yarn_truncate'] and model['rope_original_max_positions'] == 32
  theirs = transformers.Gemma3TextConfig(**copy.deepcopy(config))
  inv_freq, factor = ROPE_INIT_FUNCTIONS['yarn'](theirs, 'cpu', layer_type='full_attention')
  np.testing.assert_allclose(rope_frequencies(gemma_model(**model)), inv_freq.numpy(), rtol=1e-6)
  assert rope_attention_factor(model) == factor
  with pytest.raises(hf.HFError, match=r'model\.rope_yarn_truncate=False is no Gemma 3'):
    hf.architectures.for_model(model | {'rope_yarn_truncate': False})


def test_export_refuses_half_a_gemma():
  model = gemma_model().to_dict()
  assert hf.architectures.for_model(model) is hf.gemma3
  with pytest.raises(
      hf.HFError, match=r'model\.post_norms=False with the other Gemma fields is no'
  ):
    hf.architectures.for_model(model | {'post_norms': False})
  with pytest.raises(hf.HFError, match=r'model\.qkv_bias=True with the other Gemma fields'):
    hf.architectures.for_model(model | {'qkv_bias': True})
  plain = tiny.get_config().model.to_dict()
  with pytest.raises(hf.HFError, match=r'model\.norm_plus_one=False, .*Gemma 3 needs'):
    hf.architectures.for_model(plain | {'mlp_activation': 'gelu_tanh', 'qk_norm': True})
  # Local layers without a window: transformers' Gemma 3 cannot run the folder.
  with pytest.raises(hf.HFError, match=r'model\.sliding_window=0 with sliding_attention layers'):
    hf.architectures.for_model(model | {'sliding_window': 0})
