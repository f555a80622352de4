"""Hugging Face export and import, proven against transformers' own LlamaForCausalLM.

Random HF models (no download) are imported and must give transformers' logits; euro_lm
checkpoints from real tiny training runs are exported, loaded with AutoModelForCausalLM and
AutoTokenizer, and must give euro_lm's logits and token ids.
"""

import copy
import json
import math
import os
import pickle

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from safetensors import safe_open
from safetensors.numpy import save_file

from configs import tiny
from euro_lm import hf
from euro_lm.checkpoint import CheckpointError, load_params, resolve_checkpoint
from euro_lm.data import dataset
from euro_lm.data.tokenizer import load_tokenizer
from euro_lm.model import Decoder
from euro_lm.model.layers import rope_attention_factor, rope_frequencies
from euro_lm.train.loop import train

TOLERANCE = 1e-4
TEXTS = [
    'Grüße aus München! Die Straße ist schön, aber Ärger gibt es überall.',
    'Καλημέρα κόσμε· η ελληνική γλώσσα έχει τόνους: ά, έ, ή, ί, ό, ύ, ώ.',
    'Здравейте! Българският език използва кирилица — ъ, ю, я, щ.',
    'Dia duit, a chairde! Conas atá sibh? Tá fáilte romhaibh go léir.',
    'Café, naïve, façade, señor, São Paulo, Łódź, 2024: 12345 €.',
]
# (LlamaConfig overrides): GQA untied, MHA tied, odd dims (hidden 48, 3 heads of 16,
# intermediate 100) with multi-query attention and a non-default theta and eps.
HF_SHAPES = {
    'gqa_untied': dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=False,
    ),
    'mha_tied': dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        num_hidden_layers=3,
        tie_word_embeddings=True,
    ),
    # Llama 3.1's RoPE scaling, its original context short enough that every band of
    # frequencies (kept, blended, divided) occurs at head_dim 16.
    'llama3_rope': dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        rope_parameters={
            'rope_type': 'llama3',
            'rope_theta': 500_000.0,
            'factor': 8.0,
            'low_freq_factor': 1.0,
            'high_freq_factor': 4.0,
            'original_max_position_embeddings': 64,
        },
    ),
    'linear_rope': dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        rope_parameters={'rope_type': 'linear', 'rope_theta': 10_000.0, 'factor': 4.0},
    ),
    # YaRN as Qwen2.5's model cards add it for long contexts, its original context short
    # enough that the blend of dimensions shows within the test's positions.
    'yarn_rope': dict(
        family='qwen2',
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        rope_parameters={
            'rope_type': 'yarn',
            'rope_theta': 1_000_000.0,
            'factor': 4.0,
            'original_max_position_embeddings': 8,
        },
    ),
    # YaRN with every parameter set: other betas, no truncation, and the attention factor
    # from mscale and mscale_all_dim (DeepSeek's way).
    'yarn_mscale': dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        rope_parameters={
            'rope_type': 'yarn',
            'rope_theta': 10_000.0,
            'factor': 8.0,
            'original_max_position_embeddings': 4,
            'beta_fast': 8,
            'beta_slow': 2,
            'truncate': False,
            'mscale': 1.0,
            'mscale_all_dim': 0.5,
        },
    ),
    # Mistral with a sliding window shorter than the test's 17 tokens.
    'mistral': dict(
        family='mistral',
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        sliding_window=6,
    ),
    # Qwen2/2.5: biases on the query, key and value projections.
    'qwen2': dict(
        family='qwen2',
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        rope_parameters={'rope_type': 'default', 'rope_theta': 1_000_000.0},
    ),
    # Qwen3: QK-norm, and a head width that is not hidden_size / heads.
    'qwen3': dict(
        family='qwen3',
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        rope_parameters={'rope_type': 'default', 'rope_theta': 1_000_000.0},
    ),
    # SmolLM3: no RoPE in every 2nd layer (NoPE), YaRN in the others.
    'smollm3': dict(
        family='smollm3',
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=4,
        no_rope_layer_interval=2,
        tie_word_embeddings=True,
        pad_token_id=0,  # SmolLM3Config's is beyond the test vocabulary
        rope_parameters={
            'rope_type': 'yarn',
            'rope_theta': 5_000_000.0,
            'factor': 2.0,
            'original_max_position_embeddings': 8,
        },
    ),
    # Apertus: QK-norm, Llama 3 RoPE, and an MLP of xIELU without a gate.
    'apertus': dict(
        family='apertus',
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        pad_token_id=0,
        rope_parameters={
            'rope_type': 'llama3',
            'rope_theta': 12_000_000.0,
            'factor': 8.0,
            'original_max_position_embeddings': 8,
            'low_freq_factor': 1.0,
            'high_freq_factor': 4.0,
        },
    ),
    'odd_dims': dict(
        hidden_size=48,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=100,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
    ),
}


# model_type -> (config class, model class) of the families the tests build.
FAMILIES = {
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM),
    'ministral3': (transformers.Ministral3Config, transformers.Ministral3ForCausalLM),
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    'smollm3': (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
    'apertus': (transformers.ApertusConfig, transformers.ApertusForCausalLM),
    'gemma': (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    'gemma2': (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    'gemma3_text': (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
}


def random_hf_model(overrides, seed=0):
  """A float32 model of the family `overrides['family']` (default Llama) with every weight
  (norms included) random."""
  overrides = dict(overrides)
  config_class, model_class = FAMILIES[overrides.pop('family', 'llama')]
  config = config_class(
      **{'vocab_size': 101, 'max_position_embeddings': 64, 'attn_implementation': 'eager'}
      | overrides
  )
  torch.manual_seed(seed)
  model = model_class(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


def hf_logits(model, tokens_BL):
  with torch.no_grad():
    return model(torch.tensor(tokens_BL)).logits.float().numpy()


def euro_logits(model_config, params, tokens_BL):
  tokens_BL = jnp.asarray(tokens_BL, jnp.int32)
  segment_ids_BL = jnp.ones_like(tokens_BL)
  positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
  return np.asarray(
      Decoder(model_config).apply({'params': params}, tokens_BL, segment_ids_BL, positions_BL)
  )


def abstract_params(model_config):
  """What `--config.train.init_from` restores onto: the model's parameter shapes."""
  shapes = jax.eval_shape(
      lambda: Decoder(model_config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  )
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), nn.unbox(shapes)
  )


def random_tokens(vocab_size, seed=0, shape=(2, 17)):
  return np.random.default_rng(seed).integers(0, vocab_size, shape)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize('shape', sorted(HF_SHAPES))
def test_import_matches_transformers(tmp_path, shape):
  model = random_hf_model(HF_SHAPES[shape])
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)

  expected = HF_SHAPES[shape]
  m = config.model
  assert (m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim, m.num_layers, m.tie_embeddings) == (
      expected['hidden_size'],
      expected['num_attention_heads'],
      expected['num_key_value_heads'],
      expected['intermediate_size'],
      expected['num_hidden_layers'],
      expected['tie_word_embeddings'],
  )
  assert m.head_dim == expected.get('head_dim', 16)
  rope = expected.get('rope_parameters', {})
  assert m.rope_theta == rope.get('rope_theta', expected.get('rope_theta', 10_000.0))
  rope_type = rope.get('rope_type', 'default')
  assert m.rope_scaling == ('none' if rope_type == 'default' else rope_type)
  assert m.qk_norm == (expected.get('family') in ('qwen3', 'apertus'))
  assert (m.mlp_activation == 'xielu') == (expected.get('family') == 'apertus')
  assert m.qkv_bias == (expected.get('family') == 'qwen2')
  assert m.sliding_window == expected.get('sliding_window', 0)
  assert m.nope_interval == expected.get('no_rope_layer_interval', 0)
  with open(tmp_path / 'run' / 'config.json') as f:
    assert json.load(f)['model'] == m.to_dict()
  assert config.train.init_from == str(tmp_path / 'run')
  assert (
      f'c.model.mlp_dim = {expected["intermediate_size"]}'
      in (tmp_path / 'run' / 'hf_config.py').read_text()
  )

  # Read back exactly as a run with --config.train.init_from=<workdir> does.
  params, step_dir = load_params(str(tmp_path / 'run'), abstract_params(m))
  assert str(step_dir) == str(tmp_path / 'run' / 'checkpoints' / '0')
  tokens_BL = random_tokens(101)
  want = hf_logits(model, tokens_BL)
  got = euro_logits(m, params, tokens_BL)
  assert got.shape == want.shape == (2, 17, 101)
  assert np.abs(got - want).max() <= TOLERANCE


def test_yarn_blends_the_dimensions_and_scales_cos_and_sin(tmp_path):
  """Each of YaRN's parts matters on the test's positions: without the scaling, or with the
  attention factor at 1, the imported model's logits are not transformers'."""
  model = random_hf_model(HF_SHAPES['yarn_mscale'])
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  m = config.model
  assert (m.rope_yarn_beta_fast, m.rope_yarn_beta_slow, m.rope_yarn_truncate) == (8, 2, False)
  assert m.rope_attention_factor == (0.1 * math.log(8) + 1) / (0.05 * math.log(8) + 1)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(m))
  tokens_BL = random_tokens(101)
  want = hf_logits(model, tokens_BL)
  assert np.abs(euro_logits(m, params, tokens_BL) - want).max() <= TOLERANCE
  for field, value in (('rope_scaling', 'none'), ('rope_attention_factor', 1.0)):
    changed = m.copy_and_resolve_references()
    changed[field] = value
    assert np.abs(euro_logits(changed, params, tokens_BL) - want).max() > 1e-2, field


_YARN = {'rope_type': 'yarn', 'rope_theta': 100.0, 'factor': 4.0}


@pytest.mark.parametrize(
    'config',
    [
        # The original context beside the rope parameters wins (as Phi-3 keeps it).
        {
            'rope_parameters': _YARN | {'original_max_position_embeddings': 16},
            'original_max_position_embeddings': 32,
        },
        # rope_scaling (the older key) replaces rope_parameters, beta_fast included.
        {
            'rope_parameters': _YARN | {'beta_fast': 2},
            'rope_scaling': _YARN | {'original_max_position_embeddings': 8},
        },
        # Left out: the original context is max_position_embeddings; a null factor their ratio.
        {'rope_parameters': _YARN},
        {'rope_parameters': _YARN | {'factor': None, 'original_max_position_embeddings': 16.0}},
        # truncate null truncates nothing; mscale alone leaves the factor's attention factor.
        {
            'rope_parameters': _YARN
            | {'truncate': None, 'original_max_position_embeddings': 16, 'mscale': 2.0}
        },
        {
            'rope_parameters': _YARN
            | {'original_max_position_embeddings': 16, 'attention_factor': 1.5}
        },
    ],
)
def test_yarn_parameters_read_as_transformers_reads_them(config):
  """Frequencies and the cos/sin factor of import's fields equal transformers' own YaRN
  computation on the same config.json."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  sizes = dict(
      vocab_size=101,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=1,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
  )
  raw = copy.deepcopy(sizes | config)  # transformers standardizes the dicts it is given
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS['yarn'](transformers.Qwen2Config(**raw), 'cpu')
  model = tiny.get_config().model
  model.update(hf.model_config_from_hf({'model_type': 'qwen2'} | sizes | config))
  np.testing.assert_allclose(rope_frequencies(model), inv_freq.numpy(), rtol=1e-6)
  assert rope_attention_factor(model) == attention_factor


@pytest.mark.parametrize(
    'shape',
    [
        'mha_tied',
        'odd_dims',
        'llama3_rope',
        'yarn_mscale',
        'mistral',
        'qwen2',
        'qwen3',
        'smollm3',
        'apertus',
    ],
)
def test_import_then_export_gives_the_same_model(tmp_path, shape):
  model = random_hf_model(HF_SHAPES[shape], seed=3)
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  hf.export_hf(str(tmp_path / 'run'), str(tmp_path / 'out'), dtype='float32', log=lambda *a: None)
  original, exported = hf.SafetensorsFolder(tmp_path / 'hf'), hf.SafetensorsFolder(tmp_path / 'out')
  assert exported.names() == original.names()
  for name in original.names():
    np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', dtype=torch.float32, attn_implementation='eager', local_files_only=True
  ).eval()
  assert type(reloaded) is type(model)  # the same architecture class on the way out
  tokens_BL = random_tokens(101, seed=2)
  np.testing.assert_array_equal(hf_logits(reloaded, tokens_BL), hf_logits(model, tokens_BL))


def stored_layer_chunks(workdir, leaf='layers.mlp.w_up'):
  """Layers per stored chunk of a stacked leaf, and the number of layers."""
  store = hf.CheckpointLeaves(resolve_checkpoint(workdir) / 'state')._open('params.' + leaf)
  return store.chunk_layout.read_chunk.shape[0], store.shape[0]


def test_import_stores_one_layer_per_chunk(tmp_path):
  hf_model = random_hf_model(HF_SHAPES['mha_tied'])
  hf_model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  assert stored_layer_chunks(tmp_path / 'run') == (1, 3)


# ----------------------------------------------------------------------------- export


def test_layers_of_a_checkpoint_stored_in_one_chunk_are_read_too(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  w = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
  ocp.PyTreeCheckpointer().save(tmp_path / 'state', {'params': {'layers': {'w': w}}})
  leaves = hf.CheckpointLeaves(tmp_path / 'state')
  assert leaves._open('params.layers.w').chunk_layout.read_chunk.shape[0] == 3
  got = list(leaves.read_layers(('layers', 'w')))
  assert [i for i, _ in got] == [0, 1, 2]
  np.testing.assert_array_equal(np.stack([x for _, x in got]), w)


def test_shard_writer_streams_safetensors_that_the_library_reads(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      'a.weight': rng.normal(size=(3, 5)).astype(np.float32),
      'b.weight': rng.normal(size=(64,)).astype(ml_dtypes.bfloat16),
      'c.weight': rng.normal(size=(4, 4, 2)).astype(np.float32),
      'big': rng.normal(size=(40,)).astype(np.float32),
  }
  layout = [(name, x.shape, x.dtype) for name, x in tensors.items()]
  writer = hf.ShardWriter(str(tmp_path), layout, max_bytes=200)
  for name, x in tensors.items():
    assert not any(f.startswith('model-') for f in os.listdir(tmp_path))
    writer.add(name, x)
  assert writer.close() == 3  # a+b (188 bytes), c (128; +160 would pass 200), big (160)
  with open(tmp_path / hf.INDEX_FILE) as f:
    index = json.load(f)
  assert index['weight_map'] == {
      'a.weight': 'model-00001-of-00003.safetensors',
      'b.weight': 'model-00001-of-00003.safetensors',
      'big': 'model-00003-of-00003.safetensors',
      'c.weight': 'model-00002-of-00003.safetensors',
  }
  assert index['metadata']['total_size'] == sum(x.nbytes for x in tensors.values())
  for name, shard in index['weight_map'].items():
    with safe_open(tmp_path / shard, framework='pt') as f:  # the reference reader
      got = f.get_tensor(name)
    want = tensors[name]
    np.testing.assert_array_equal(got.float().numpy(), want.astype(np.float32), err_msg=name)
    assert (
        str(got.dtype)
        == {'float32': 'torch.float32', 'bfloat16': 'torch.bfloat16'}[str(want.dtype)]
    )


def test_shard_writer_refuses_a_tensor_out_of_plan_and_aborts_cleanly(tmp_path):
  writer = hf.ShardWriter(
      str(tmp_path), [('a', (2,), np.float32), ('b', (2,), np.float32)], max_bytes=4
  )
  writer.add('a', np.zeros(2, np.float32))
  with pytest.raises(ValueError, match=r'got b \(3,\) float32, expected b \(2,\) float32'):
    writer.add('b', np.zeros(3, np.float32))
  with pytest.raises(ValueError, match='b was never written'):
    writer.close()
  writer.abort()
  assert os.listdir(tmp_path) == []


# Five languages keep tokenizer training and the final validation pass short.
RUN = {
    'model.num_layers': 2,
    'train.steps': 3,
    'train.global_batch_size': 8,
    'train.seq_len': 32,
    'train.log_every': 1,
    'train.eval_every': 0,
    'train.checkpoint_every': 3,
    'data.languages': 'deu_Latn,ell_Grek,bul_Cyrl,gle_Latn,fra_Latn',
}


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  """One SentencePiece model, trained once, for both training runs."""
  workdir = tmp_path_factory.mktemp('tokenizer')
  config = tiny.get_config()
  config.update_from_flattened_dict(RUN)
  dataset.make_data(config, str(workdir))
  return str(workdir / 'tokenizer.model')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tokenizer_path):
  """A real tiny training run (3 steps; GQA, untied, head_dim 48 != embed_dim / heads), and
  its export (float32, tiny shards). Tied exports are covered by the round trip above."""
  root = tmp_path_factory.mktemp('trained')
  config = tiny.get_config()
  config.update_from_flattened_dict(
      {
          **RUN,
          'model.tie_embeddings': False,
          'model.head_dim': 48,
          'data.tokenizer_path': tokenizer_path,
      }
  )
  workdir = str(root / 'run')
  train(config, workdir)
  output = str(root / 'hf')
  hf.export_hf(workdir, output, dtype='float32', shard_bytes=3 * 2**20, log=lambda *a: None)
  return config, workdir, output


def test_export_loads_in_transformers_with_the_same_logits(trained):
  config, workdir, output = trained
  files = sorted(os.listdir(output))
  shards = [f for f in files if f.endswith('.safetensors')]
  assert len(shards) > 1 and shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
  for name in (
      'config.json',
      'generation_config.json',
      'model.safetensors.index.json',
      'tokenizer.model',
      'tokenizer.json',
      'tokenizer_config.json',
      'special_tokens_map.json',
  ):
    assert name in files
  with open(os.path.join(output, 'model.safetensors.index.json')) as f:
    index = json.load(f)
  assert set(index['weight_map'].values()) == set(shards)
  with open(os.path.join(output, 'config.json')) as f:
    assert json.load(f)['architectures'] == ['LlamaForCausalLM']

  model = transformers.AutoModelForCausalLM.from_pretrained(
      output, dtype=torch.float32, attn_implementation='eager', local_files_only=True
  ).eval()
  assert type(model).__name__ == 'LlamaForCausalLM'
  assert ('lm_head.weight' in index['weight_map']) == (not config.model.tie_embeddings)
  params, _ = load_params(workdir, abstract_params(config.model))
  tokens_BL = random_tokens(config.model.vocab_size, seed=1, shape=(2, 32))
  want = euro_logits(config.model, params, tokens_BL)
  got = hf_logits(model, tokens_BL)
  assert np.abs(got - want).max() <= TOLERANCE


def test_training_checkpoints_store_one_layer_per_chunk(trained):
  _, workdir, _ = trained
  assert stored_layer_chunks(workdir) == (1, 2)
  assert stored_layer_chunks(workdir, 'layers.attention_norm.scale') == (1, 2)


def test_export_bfloat16_rounds_the_float32_weights(trained, tmp_path):
  _, workdir, output = trained
  hf.export_hf(workdir, str(tmp_path), step=3, dtype='bfloat16', log=lambda *a: None)
  full, half = hf.SafetensorsFolder(output), hf.SafetensorsFolder(str(tmp_path))
  assert half.names() == full.names()
  assert len([f for f in os.listdir(tmp_path) if f.endswith('.safetensors')]) == 1
  for name in full.names():
    assert half.get(name).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(half.get(name), full.get(name).astype(ml_dtypes.bfloat16))


def test_exported_tokenizer_gives_euro_lm_ids(trained, tokenizer_path):
  _, _, output = trained
  ours = load_tokenizer(tokenizer_path)
  theirs = transformers.AutoTokenizer.from_pretrained(output, local_files_only=True)
  assert theirs.is_fast
  for text in TEXTS:
    ids = ours.encode(text)
    assert len(ids) > 5
    assert theirs(text, add_special_tokens=False).input_ids == ids, text
    assert theirs(text).input_ids == [ours.bos_id] + ids, text
    assert theirs.decode(ids) == ours.decode(ids)
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
      ours.bos_id,
      ours.eos_id,
      ours.pad_id,
  )


# -------------------------------------------------------------------------- bad input


def test_pickled_weights_are_refused(tmp_path):
  random_hf_model(HF_SHAPES['gqa_untied']).config.save_pretrained(tmp_path)
  with open(tmp_path / 'pytorch_model.bin', 'wb') as f:
    pickle.dump({'not': 'loaded'}, f)
  with pytest.raises(
      hf.HFError,
      match=r'no \*\.safetensors weights in .*pytorch_model\.bin: ' r'pickled PyTorch weights',
  ):
    hf.import_hf(str(tmp_path), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
    'field, value, message',
    [
        (
            'rope_scaling',
            {'rope_type': 'dynamic', 'factor': 2.0},
            r"rope_scaling\.rope_type='dynamic'",
        ),
        (
            'rope_scaling',
            {'rope_type': 'llama3', 'factor': 8.0},
            r'rope_scaling\.low_freq_factor is missing',
        ),
        ('rope_parameters', [1e4], r'rope_parameters=\[10000\.0\] must be an object'),
        (
            'rope_parameters',
            {'rope_type': 'dynamic', 'rope_theta': 1e4, 'factor': 4.0},
            r"rope_parameters\.rope_type='dynamic' is not supported",
        ),
        (
            'rope_parameters',
            {'rope_type': 'yarn', 'rope_theta': 1e4, 'original_max_position_embeddings': 8},
            r"rope_parameters\.factor is missing for rope_type='yarn'",
        ),
        (
            'rope_parameters',
            {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 2.0, 'truncate': 'no'},
            r"rope_parameters: truncate='no' must be true or false",
        ),
        (
            'rope_parameters',
            {'rope_type': 'linear', 'factor': 2.0, 'partial_rotary_factor': 0.5},
            r"partial_rotary_factor=0\.5 with rope_type='linear' is not supported",
        ),
        ('attention_bias', True, r'attention_bias=true is not supported'),
        ('mlp_bias', True, r'mlp_bias=true is not supported'),
        ('model_type', 'gpt2', r"model_type='gpt2' is not supported"),
        ('architectures', ['LlamaForSequenceClassification'], r'architectures=.* not supported'),
        ('hidden_act', 'gelu', r"hidden_act='gelu' is not supported"),
        # Values of the wrong type or range: one error naming the field, never a traceback.
        ('hidden_size', None, r'hidden_size=None must be a positive integer'),
        ('num_attention_heads', 0, r'num_attention_heads=0 must be a positive integer'),
        ('vocab_size', '300x', r"vocab_size='300x' must be a positive integer"),
        ('rms_norm_eps', None, r'rms_norm_eps=None must be a positive number'),
        (
            'rope_parameters',
            {'rope_type': 'default', 'rope_theta': None},
            r'rope_theta=None must be a positive number',
        ),
        ('tie_word_embeddings', 'false', r"tie_word_embeddings='false' must be true or false"),
        (
            'rope_scaling',
            {'rope_type': 'linear', 'factor': 'eight'},
            r"rope_scaling: factor='eight' must be a positive number",
        ),
        (
            'rope_scaling',
            {'rope_type': ['linear'], 'factor': 2.0},
            r"rope_scaling\.rope_type=\['linear'\] is not supported",
        ),
    ],
)
def test_unsupported_config_fields_are_refused(tmp_path, field, value, message):
  random_hf_model(HF_SHAPES['gqa_untied']).save_pretrained(tmp_path, safe_serialization=True)
  with open(tmp_path / 'config.json') as f:
    config = json.load(f)
  config[field] = value
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  with pytest.raises(hf.HFError, match=r'config\.json: ' + message):
    hf.import_hf(str(tmp_path), str(tmp_path / 'run'))


@pytest.mark.parametrize(
    'model_type, config_class, extra',
    [
        ('llama', transformers.LlamaConfig, {}),
        ('mistral', transformers.MistralConfig, {}),
        ('mistral', transformers.MistralConfig, {'sliding_window': None}),
        ('qwen2', transformers.Qwen2Config, {}),
        ('qwen2', transformers.Qwen2Config, {'use_sliding_window': True, 'max_window_layers': 2}),
        ('qwen3', transformers.Qwen3Config, {}),
        ('smollm3', transformers.SmolLM3Config, {}),
        ('apertus', transformers.ApertusConfig, {}),
    ],
)
def test_left_out_fields_take_transformers_defaults(model_type, config_class, extra):
  """A config.json of sizes alone: the heads, head width, window, norm epsilon, RoPE base
  and tying that transformers' config class gives it (Mistral's window is 4096, its
  key/value heads 8; Qwen3's head width 128)."""
  sizes = {  # 32 heads: Qwen's default key/value heads
      'hidden_size': 128,
      'num_attention_heads': 32,
      'num_hidden_layers': 2,
      'intermediate_size': 40,
      'vocab_size': 10,
  }
  model = hf.model_config_from_hf({'model_type': model_type, **sizes, **extra})
  reference = config_class(**sizes, **extra)
  head_dim = getattr(reference, 'head_dim', None) or 128 // 32
  assert (model['num_kv_heads'], model['head_dim']) == (reference.num_key_value_heads, head_dim)
  windows = {t for t in getattr(reference, 'layer_types', None) or [] if t != 'full_attention'}
  window = getattr(reference, 'sliding_window', None) if model_type == 'mistral' else None
  assert model.get('sliding_window', 0) == (window or 0) and not windows
  assert model['norm_eps'] == reference.rms_norm_eps
  assert model['rope_theta'] == reference.rope_parameters['rope_theta']
  assert model['tie_embeddings'] == reference.tie_word_embeddings


def test_windows_are_refused_where_transformers_would_slide():
  """Qwen2 slides from layer max_window_layers on when use_sliding_window is true (as
  transformers derives its layer_types); euro_lm refuses exactly those configs."""
  sizes = {
      'model_type': 'qwen2',
      'hidden_size': 64,
      'num_attention_heads': 8,
      'num_key_value_heads': 8,
      'num_hidden_layers': 4,
      'intermediate_size': 40,
      'vocab_size': 10,
      'use_sliding_window': True,
      'sliding_window': 16,
  }
  for first in (0, 2, 4, 8):
    config = dict(sizes, max_window_layers=first)
    slides = 'sliding_attention' in transformers.Qwen2Config(**config).layer_types
    if slides:
      with pytest.raises(hf.HFError, match=f'max_window_layers={first} .of 4 layers'):
        hf.model_config_from_hf(config)
    else:
      assert hf.model_config_from_hf(config)['num_layers'] == 4
    assert slides == (first < 4)
  with pytest.raises(hf.HFError, match=r'sliding_window=-1 must be a positive integer'):
    hf.model_config_from_hf({**sizes, 'model_type': 'mistral', 'sliding_window': -1})


def test_bias_tensors_are_refused(tmp_path):
  model = random_hf_model(HF_SHAPES['gqa_untied'])
  model.save_pretrained(tmp_path, safe_serialization=True)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  save_file(
      state | {'model.layers.0.self_attn.q_proj.bias': np.zeros(64, np.float32)},
      str(tmp_path / 'model.safetensors'),
  )
  with pytest.raises(hf.HFError, match=r'bias tensors \(model\.layers\.0\.self_attn\.q_proj'):
    hf.import_hf(str(tmp_path), str(tmp_path / 'run'))


def test_qk_norm_exports_as_qwen3():
  model = tiny.get_config().model.to_dict()
  assert hf.architectures.for_model(model) is hf.llama
  model['qk_norm'] = True
  arch = hf.architectures.for_model(model)
  config = arch.hf_config(model, bos_token_id=2, eos_token_id=3)
  assert (config['model_type'], config['architectures']) == ('qwen3', ['Qwen3ForCausalLM'])
  assert transformers.Qwen3Config(**config).layer_types == ['full_attention'] * 4
  assert 'model.layers.3.self_attn.k_norm.weight' in arch.expected_hf_shapes(model)
  model['qkv_bias'] = True  # QK-norm and biases together: no HF architecture has both
  with pytest.raises(hf.HFError, match='model.qk_norm and model.qkv_bias together are no'):
    hf.architectures.for_model(model)


def test_nope_layers_follow_smollm3s_flags(tmp_path):
  """SmolLM3's layers without RoPE matter (rotating them too gives other logits), come
  from `no_rope_layers` where given, and a pattern of no one interval, a sliding window or
  NoPE beside another family's feature is refused."""
  model = random_hf_model(HF_SHAPES['smollm3'])
  model.save_pretrained(tmp_path / 'hf')
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  tokens_BL = random_tokens(101)
  rotating = config.model.copy_and_resolve_references()
  rotating.nope_interval = 0
  assert np.abs(euro_logits(rotating, params, tokens_BL) - hf_logits(model, tokens_BL)).max() > 1e-2

  sizes = dict(
      model_type='smollm3',
      hidden_size=64,
      num_attention_heads=4,
      num_hidden_layers=6,
      intermediate_size=40,
      vocab_size=10,
  )
  assert hf.model_config_from_hf(sizes)['nope_interval'] == 4  # transformers' default
  flags = {'no_rope_layers': [1, 1, 0, 1, 1, 0, 1, 0]}  # longer than the layers: read 6
  assert hf.model_config_from_hf(sizes | flags)['nope_interval'] == 3
  assert hf.model_config_from_hf(sizes | {'no_rope_layers': [1] * 6})['nope_interval'] == 0
  with pytest.raises(hf.HFError, match=r'no_rope_layers=\[1, 0, 1, 1, 0, 1\] is not supported'):
    hf.model_config_from_hf(sizes | {'no_rope_layers': [1, 0, 1, 1, 0, 1]})
  with pytest.raises(hf.HFError, match=r'no_rope_layers must be a list of at least 6 flags'):
    hf.model_config_from_hf(sizes | {'no_rope_layers': [1, 0]})
  with pytest.raises(hf.HFError, match=r'sliding windows .* are not supported for SmolLM3'):
    hf.model_config_from_hf(sizes | {'use_sliding_window': True, 'sliding_window': 4})
  exported = tiny.get_config().model.to_dict() | {'nope_interval': 2}
  written = hf.architectures.for_model(exported).hf_config(exported, bos_token_id=2, eos_token_id=3)
  assert transformers.SmolLM3Config(**written).no_rope_layers == [1, 0, 1, 0]
  with pytest.raises(hf.HFError, match='model.qk_norm and model.nope_interval together are no'):
    hf.architectures.for_model(exported | {'qk_norm': True})


def test_xielu_exports_as_apertus():
  """An xIELU model with QK-norm is Apertus (its config runs in transformers with the same
  layers); without QK-norm, or with another family's feature, it is no HF architecture."""
  model = tiny.get_config().model.to_dict() | {'mlp_activation': 'xielu', 'qk_norm': True}
  arch = hf.architectures.for_model(model)
  config = arch.hf_config(model, bos_token_id=2, eos_token_id=3)
  assert (config['model_type'], config['hidden_act']) == ('apertus', 'xielu')
  assert transformers.ApertusConfig(**config).num_hidden_layers == model['num_layers']
  shapes = arch.expected_hf_shapes(model)
  assert 'model.layers.0.mlp.gate_proj.weight' not in shapes
  assert shapes['model.layers.3.mlp.act_fn.eps'] == ()
  assert shapes['model.layers.3.feedforward_layernorm.weight'] == (model['embed_dim'],)
  with pytest.raises(hf.HFError, match=r"model.qk_norm=False with model.mlp_activation='xielu'"):
    hf.architectures.for_model(model | {'qk_norm': False})
  with pytest.raises(hf.HFError, match=r'model.sliding_window=8 with .* Apertus needs'):
    hf.architectures.for_model(model | {'sliding_window': 8})
  with pytest.raises(
      hf.HFError, match=r"hidden_act='gelu' is not supported; this family uses 'xielu'"
  ):
    hf.model_config_from_hf({'model_type': 'apertus', 'hidden_act': 'gelu'})


LLAMA3 = {
    'rope_type': 'llama3',
    'factor': 8.0,
    'original_max_position_embeddings': 8192,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
}


@pytest.mark.parametrize(
    'rope',
    [
        {},
        {'rope_scaling': LLAMA3},
        {'rope_parameters': LLAMA3},
        {'rope_parameters': {'rope_type': 'default'}},
        {'rope_theta': 1e6},
        {'rope_parameters': None},
        {'rope_scaling': None, 'rope_theta': 5e5},
        {'rope_parameters': LLAMA3 | {'rope_theta': 5e5}},
    ],
)
def test_apertus_rope_reads_as_transformers_reads_it(rope):
  """ApertusConfig's Llama 3 RoPE where a config names no RoPE dict (a bare rope_theta is
  ignored then), and its theta of 12M where a dict leaves it out."""
  sizes = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=40)
  model = hf.model_config_from_hf({'model_type': 'apertus', 'vocab_size': 10, **sizes, **rope})
  want = transformers.ApertusConfig(**sizes, **copy.deepcopy(rope)).rope_parameters
  assert model['rope_theta'] == want['rope_theta']
  assert model['rope_scaling'] == {'default': 'none'}.get(want['rope_type'], want['rope_type'])
  if want['rope_type'] == 'llama3':
    assert model['rope_scaling_factor'] == want['factor']


def test_command_lines(tmp_path):
  """The entry points: import a random HF model, export it again, and refuse bad input
  with one 'error:' line rather than a traceback."""
  import subprocess
  import sys

  random_hf_model(HF_SHAPES['odd_dims']).save_pretrained(tmp_path / 'hf', safe_serialization=True)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd())
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', *args],
      capture_output=True,  # noqa
      text=True,
      env=env,
      timeout=300,
  )
  done = run('euro_lm.import_hf', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}')
  assert done.returncode == 0, done.stderr
  assert f'--config.train.init_from={tmp_path / "run"}' in done.stdout
  assert '--config.model.head_dim=16' in done.stdout
  done = run(
      'euro_lm.export_hf',
      f'--workdir={tmp_path / "run"}',
      f'--output={tmp_path / "out"}',
      '--dtype=float32',
  )
  assert done.returncode == 0, done.stderr
  assert sorted(hf.SafetensorsFolder(tmp_path / 'out').names()) == sorted(
      hf.SafetensorsFolder(tmp_path / 'hf').names()
  )
  again = run('euro_lm.export_hf', f'--workdir={tmp_path / "run"}', f'--output={tmp_path / "out"}')
  assert again.returncode == 1
  assert again.stderr.strip() == (
      f'error: --output={tmp_path / "out"} already holds '
      'model-00001-of-00001.safetensors; export into a new directory'
  )


@pytest.mark.parametrize(
    'shape',
    ['gqa_untied', 'llama3_rope', 'yarn_rope', 'mistral', 'qwen2', 'qwen3', 'smollm3', 'apertus'],
)
def test_greedy_generation_equals_transformers_generate(tmp_path, shape):
  """The same imported model and prompts: euro_lm's cached greedy decoding gives exactly
  the tokens of transformers' greedy `generate`. EOS is disabled on both sides, so both
  produce every requested token."""
  model = random_hf_model(HF_SHAPES[shape], seed=3)
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  assert_greedy_equals_transformers(model, config.model, params)


def assert_greedy_equals_transformers(model, model_config, params, new_tokens=12):
  """euro_lm's cached greedy decoding of two left-padded prompts (18 positions in all)
  gives the tokens of transformers' greedy `generate` of `model`, EOS disabled on both."""
  from euro_lm.sampling import generate

  prompts = [[5, 17, 42, 8, 99, 3], [7, 7, 61]]
  expected = []
  for prompt in prompts:  # one at a time: no padding conventions to match
    with torch.no_grad():
      out = model.generate(
          torch.tensor([prompt]),
          max_new_tokens=new_tokens,
          do_sample=False,
          eos_token_id=None,
          pad_token_id=0,
      )
    expected.append(out[0, len(prompt) :].tolist())
  tokens_BP = np.zeros((2, 6), np.int32)
  for row, prompt in enumerate(prompts):  # left padding, as euro_lm.sampling expects
    tokens_BP[row, 6 - len(prompt) :] = prompt
  got = generate(
      Decoder(model_config),
      params,
      tokens_BP,
      np.array([6, 3], np.int32),
      jax.random.key(0),
      max_new_tokens=new_tokens,
      eos_id=-1,
  )
  assert np.asarray(got.tokens_BN).tolist() == expected


def test_import_follows_the_index_file(tmp_path):
  """A sharded folder with model.safetensors.index.json and, as Mistral's folders have, a
  `consolidated.safetensors` of other weights: import reads what the index maps."""
  model = random_hf_model(HF_SHAPES['gqa_untied'])
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True, max_shard_size='60KB')
  assert len(list((tmp_path / 'hf').glob('model-*.safetensors'))) > 1
  decoy = random_hf_model(HF_SHAPES['gqa_untied'], seed=9).state_dict()
  save_file({k: v.numpy() for k, v in decoy.items()}, str(tmp_path / 'hf/consolidated.safetensors'))
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  tokens_BL = random_tokens(101)
  assert np.abs(
      euro_logits(config.model, params, tokens_BL) - hf_logits(model, tokens_BL)
  ).max() <= (TOLERANCE)
  # Without the index, the same tensor in two files is refused rather than guessed.
  (tmp_path / 'hf' / hf.INDEX_FILE).unlink()
  with pytest.raises(hf.HFError, match=r'tensor \S+ is in both \S+ and \S+, and no model\.safe'):
    hf.SafetensorsFolder(tmp_path / 'hf')


@pytest.mark.parametrize(
    'index, message',
    [
        ('{"weight_map": ', r'index\.json is not a safetensors index \(JSONDecodeError'),
        ('{"weight_map": [1]}', r'weight_map must map tensor names to file names'),
        ('{"weight_map": {"lm_head.weight": "gone.safetensors"}}', r'names gone\.safetensors'),
        (
            '{"weight_map": {"lm_head.weight": "model-1.safetensors", "x": "model-1.safetensors"}}',
            r'maps x to model-1\.safetensors, which does not hold it',
        ),
    ],
)
def test_a_bad_index_file_is_named(tmp_path, index, message):
  random_hf_model(HF_SHAPES['gqa_untied']).save_pretrained(tmp_path, safe_serialization=True)
  os.rename(tmp_path / 'model.safetensors', tmp_path / 'model-1.safetensors')  # one shard
  (tmp_path / hf.INDEX_FILE).write_text(index)
  with pytest.raises(hf.HFError, match=message):
    hf.SafetensorsFolder(tmp_path)


def test_a_header_longer_than_the_file_is_named(tmp_path):
  (tmp_path / 'model.safetensors').write_bytes((10**9).to_bytes(8, 'little') + b'{}')
  with pytest.raises(hf.HFError, match=r'not a safetensors file: its header length 1000000000'):
    hf.SafetensorsFolder(tmp_path)


def test_a_weights_file_cut_short_is_named(tmp_path):
  """An interrupted download: the header is whole, the data is not."""
  random_hf_model(HF_SHAPES['gqa_untied']).save_pretrained(tmp_path, safe_serialization=True)
  path = tmp_path / 'model.safetensors'
  size = path.stat().st_size
  os.truncate(path, size - 5000)
  with pytest.raises(hf.HFError, match=r'not a safetensors file: tensor \S+ ends at byte \d+, pas'):
    hf.SafetensorsFolder(tmp_path)


@pytest.mark.parametrize(
    'text, message',
    [('{"model_type": "llama",', 'is not readable JSON'), ('[1, 2]', 'holds a JSON list')],
)
def test_a_config_that_is_no_json_object_is_named(tmp_path, text, message):
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(hf.HFError, match=f'config\\.json {message}'):
    hf.import_hf(str(tmp_path), str(tmp_path / 'run'))


def test_model_safetensors_is_read_as_transformers_reads_it(tmp_path):
  """model.safetensors beside a `consolidated.safetensors` holding the same names (Mistral's
  folders): transformers reads model.safetensors alone, and so does import."""
  model = random_hf_model(HF_SHAPES['gqa_untied'])
  model.save_pretrained(tmp_path, safe_serialization=True)
  decoy = random_hf_model(HF_SHAPES['gqa_untied'], seed=9).state_dict()
  save_file({k: v.numpy() for k, v in decoy.items()}, str(tmp_path / 'consolidated.safetensors'))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  config = hf.import_hf(str(tmp_path), str(tmp_path / 'run'), log=lambda *a: None)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  tokens_BL = random_tokens(101)
  assert np.abs(hf_logits(loaded, tokens_BL) - hf_logits(model, tokens_BL)).max() <= TOLERANCE
  assert np.abs(
      euro_logits(config.model, params, tokens_BL) - hf_logits(model, tokens_BL)
  ).max() <= (TOLERANCE)


def test_a_tied_config_with_a_distinct_lm_head_is_refused(tmp_path):
  """transformers 5 runs such a folder untied and 4 tied: import refuses to guess, unless
  the stored copy equals the embedding (a harmless duplicate)."""
  model = random_hf_model(HF_SHAPES['mha_tied'])
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  model.save_pretrained(tmp_path / 'same', safe_serialization=True)
  save_file(
      state | {'lm_head.weight': state['model.embed_tokens.weight']},
      str(tmp_path / 'same' / 'model.safetensors'),
  )
  config = hf.import_hf(str(tmp_path / 'same'), str(tmp_path / 'run'), log=lambda *a: None)
  assert config.model.tie_embeddings
  model.save_pretrained(tmp_path / 'other', safe_serialization=True)
  save_file(
      state | {'lm_head.weight': state['model.embed_tokens.weight'] + 1},
      str(tmp_path / 'other' / 'model.safetensors'),
  )
  with pytest.raises(hf.HFError, match=r'tie_word_embeddings=true, but the folder stores an lm_'):
    hf.import_hf(str(tmp_path / 'other'), str(tmp_path / 'run2'))


def test_export_declares_the_imported_models_context(tmp_path):
  """Llama 3.1's 131072 positions survive an import and export (the run's seq_len is
  shorter); --max_position_embeddings still decides when given."""
  model = random_hf_model({**HF_SHAPES['gqa_untied'], 'max_position_embeddings': 131072})
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  assert config.train.seq_len < 131072
  for given, declared in ((None, 131072), (2048, 2048)):
    out = tmp_path / f'export-{given}'
    hf.export_hf(
        str(tmp_path / 'run'), str(out), max_position_embeddings=given, log=lambda *a: None
    )
    exported = json.loads((out / 'config.json').read_text())
    assert exported['max_position_embeddings'] == declared


def test_a_model_imported_without_a_tokenizer_does_not_train_with_a_new_one(tmp_path):
  """Its HF folder had no tokenizer.model: training from it refuses to start rather than
  train a fresh tokenizer whose ids mean nothing to the imported parameters."""
  random_hf_model(HF_SHAPES['gqa_untied']).save_pretrained(tmp_path / 'hf', safe_serialization=True)
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'imported'), log=lambda *a: None)
  assert not config.data.tokenizer_path
  config.train.steps, config.train.global_batch_size, config.train.seq_len = 1, 8, 32
  with pytest.raises(CheckpointError, match=r'carries no tokenizer .* set data\.tokenizer_path'):
    train(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'tokenizer.model').exists()  # none was trained


def test_nan_weights_are_refused_and_a_failed_import_can_be_retried(tmp_path):
  model = random_hf_model(HF_SHAPES['gqa_untied'])
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  weights = tmp_path / 'hf' / 'model.safetensors'
  good = weights.read_bytes()
  tensors = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  tensors['model.layers.1.mlp.up_proj.weight'][3, 5] = np.nan
  save_file(tensors, str(weights))
  with pytest.raises(hf.HFError, match=r'model\.layers\.1\.mlp\.up_proj\.weight holds NaN'):
    hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == []  # nothing half-written remains
  weights.write_bytes(good)
  config = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'), log=lambda *a: None)
  params, _ = load_params(str(tmp_path / 'run'), abstract_params(config.model))
  tokens_BL = random_tokens(101)
  assert np.abs(
      euro_logits(config.model, params, tokens_BL) - hf_logits(model, tokens_BL)
  ).max() <= (TOLERANCE)
