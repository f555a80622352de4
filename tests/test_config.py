"""Config validation and the command line's error messages."""

import os
import subprocess
import sys

import jax
import pytest

from configs import base, llama_1b, llama_7b, llama_125m, tiny
from euro_lm import devices
from euro_lm.config import validate
from euro_lm.errors import ConfigError
from euro_lm.model import param_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_presets_override_but_never_add_fields():
  def fields(c, prefix=''):
    out = set()
    for k, v in c.items():
      out |= fields(v, f'{prefix}{k}.') if hasattr(v, 'items') else {prefix + k}
    return out

  reference = fields(base.get_config())
  for preset in (
      tiny.get_config(),
      llama_125m.get_config(),
      llama_1b.get_config('gpu'),
      llama_7b.get_config('gpu'),
  ):
    assert fields(preset) == reference


@pytest.mark.parametrize(
    'module,low,high',
    [(llama_125m, 100e6, 150e6), (llama_1b, 1.0e9, 1.5e9), (llama_7b, 6.0e9, 7.5e9)],
)
def test_presets_have_their_advertised_size(module, low, high):
  assert low < param_count(module.get_config().model) < high


def test_a_valid_config_resolves_the_mesh():
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 2
  assert validate(c, num_devices=8) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  c.mesh.data, c.mesh.dcn_data = -1, 2
  assert validate(c, num_devices=16) == {'data': 4, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize(
    'overrides,message',
    [
        ({'model.attention_impl': 'flash'}, "model.attention_impl='flash' is not one of"),
        ({'model.compute_dtype': 'fp8'}, "model.compute_dtype='fp8'"),
        ({'model.remat_policy': 'some'}, "model.remat_policy='some'"),
        ({'model.rope_scaling': 'dynamic'}, "model.rope_scaling='dynamic' is not one of"),
        (
            {'model.rope_scaling': 'linear', 'model.rope_scaling_factor': 0.0},
            'model.rope_scaling_factor=0.0 must be positive',
        ),
        (
            {'model.rope_scaling': 'yarn', 'model.rope_yarn_beta_slow': 0.0},
            'model.rope_yarn_beta_fast=32.0 and model.rope_yarn_beta_slow=0.0 must be positive',
        ),
        (
            {'model.rope_scaling': 'yarn', 'model.rope_attention_factor': -1.0},
            'model.rope_attention_factor=-1.0 must be 0 .derived. or positive',
        ),
        (
            {'model.rope_scaling': 'yarn', 'model.rope_original_max_positions': 0},
            'model.rope_original_max_positions=0 must be positive',
        ),
        (
            {'model.rope_scaling': 'llama3', 'model.rope_low_freq_factor': 4.0},
            'model.rope_low_freq_factor=4.0 must be positive and below model.rope_high_freq',
        ),
        (
            {'model.rope_scaling': 'llama3', 'model.rope_original_max_positions': 0},
            'model.rope_original_max_positions=0 must be positive',
        ),
        ({'optimizer.schedule': 'linear'}, "optimizer.schedule='linear'"),
        ({'model.num_kv_heads': 3}, 'model.num_heads=4 is not divisible by model.num_kv_heads=3'),
        (
            {'mesh.tensor': 8, 'mesh.data': 1},
            'model.num_heads=4 is not divisible by the tensor-parallel degree 8',
        ),
        (
            {'mesh.data': 8, 'train.global_batch_size': 12},
            'train.global_batch_size=12 .* is not divisible by the data-parallel size 8',
        ),
        (
            {'train.grad_accum_steps': 3},
            'train.global_batch_size=16 is not divisible by train.grad_accum_steps=3',
        ),
        ({'mesh.data': 16}, r'data\*fsdp\*tensor = 16\*1\*1 = 16 but 8 devices are present'),
        ({'mesh.dcn_data': 3}, r'mesh.dcn_\* multiply to 3, which does not divide the 8 devices'),
        ({'mesh.data': -1, 'mesh.fsdp': -1}, 'only one of data/fsdp/tensor may be -1'),
        ({'train.steps': 0}, 'train.steps=0 must be positive'),
        ({'optimizer.warmup_steps': -1}, 'optimizer.warmup_steps=-1 must be >= 0'),
        ({'train.keep_checkpoints': 0}, 'train.keep_checkpoints=0 must be >= 1'),
        ({'train.profile_steps': 0}, 'train.profile_steps=0 must be >= 1'),
        ({'train.profile_start_step': -1}, 'train.profile_start_step=-1 must be >= 0'),
        ({'model.nope_interval': -1}, 'model.nope_interval=-1 must be >= 0'),
        ({'model.nope_interval': 99}, 'model.nope_interval=99 is more than model.num_layers'),
        (
            {'model.attention_impl': 'cudnn'},
            "model.attention_impl='cudnn' needs model.compute_dtype",
        ),
        (
            {'model.attention_impl': 'pallas', 'train.seq_len': 96},
            'train.seq_len=96 must be a multiple of 64',
        ),
        (
            {'model.pallas_backend': 'triton'},
            "model.pallas_backend='triton' is not one of 'auto', 'gpu'",
        ),
        (
            {'model.attention_impl': 'pallas', 'model.pallas_backend': 'mosaic_gpu'},
            "model.pallas_backend='mosaic_gpu' needs model.compute_dtype bfloat16 or float16",
        ),
        (
            {
                'model.attention_impl': 'pallas',
                'model.pallas_backend': 'mosaic_gpu',
                'model.compute_dtype': 'bfloat16',
                'train.seq_len': 192,
            },
            'train.seq_len=192 must be a multiple of 128',
        ),
        (
            {
                'model.attention_impl': 'pallas',
                'model.pallas_backend': 'mosaic_gpu',
                'model.compute_dtype': 'bfloat16',
                'model.head_dim': 32,
            },
            "model.pallas_backend='mosaic_gpu' needs model.head_dim 64 or 128, not 32",
        ),
    ],
)
def test_impossible_settings_name_the_field(overrides, message):
  c = tiny.get_config()
  for path, value in overrides.items():
    section, field = path.split('.')
    c[section][field] = value
  with pytest.raises(ConfigError, match=message):
    validate(c, num_devices=8)


def test_platform_and_process_checks():
  c = tiny.get_config()
  c.model.attention_impl, c.model.compute_dtype = 'cudnn', 'bfloat16'
  with pytest.raises(ConfigError, match="'cudnn' needs an NVIDIA GPU; this is a cpu run"):
    validate(c, num_devices=8, device=devices.Device('cpu'))
  validate(c, num_devices=8, device=devices.Device('cuda'))
  # LUMI: JAX says 'gpu' for AMD GPUs too; devices.platform tells ROCm apart.
  with pytest.raises(ConfigError, match="this is a rocm run \\(use 'pallas'"):
    validate(c, num_devices=8, device=devices.Device('rocm'))
  assert devices.describe() == devices.Device('cpu', kind=jax.devices()[0].device_kind)
  c = tiny.get_config()
  c.model.attention_impl, c.model.compute_dtype = 'pallas', 'bfloat16'
  for backend, platforms in (
      ('mosaic_gpu', ('cuda', 'cpu')),
      ('tpu', ('tpu', 'cpu')),
      ('gpu', ('cuda', 'rocm', 'cpu')),
  ):
    c.model.pallas_backend = backend
    for platform in ('cpu', 'cuda', 'rocm', 'tpu'):
      if platform in platforms:
        validate(c, num_devices=8, device=devices.Device(platform))
      else:
        with pytest.raises(
            ConfigError, match=f"pallas_backend='{backend}' cannot run on this {platform} run"
        ):
          validate(c, num_devices=8, device=devices.Device(platform))
  c = tiny.get_config()
  c.mesh.data, c.mesh.tensor = 4, 2  # 4 batch shards cannot feed 8 processes
  with pytest.raises(ConfigError, match='split 4 ways .* each of the 8 processes its own rows'):
    validate(c, num_devices=8, process_count=8)
  c.mesh.data, c.mesh.tensor, c.mesh.dcn_data = 4, 1, 2  # 2 nodes x 4 GPUs, 8 processes
  with pytest.raises(ConfigError, match='mesh.dcn_\\* multiply to 2 but there are 8 processes'):
    validate(c, num_devices=8, process_count=8, device=devices.Device('cuda'))


def run_cli(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'euro_lm.train', *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.mark.parametrize(
    'override,message',
    [
        ('--config.train.stepz=5', 'stepz'),
        ('--config.train.steps=many', 'many'),
        ('--config.model.attention_impl=flash', "model.attention_impl='flash' is not one of"),
    ],
)
def test_bad_overrides_get_one_clear_error(tmp_path, override, message):
  workdir = tmp_path / 'run'
  result = run_cli('--config=configs/tiny.py', f'--workdir={workdir}', override)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert not workdir.exists() or not any(workdir.iterdir())


def test_unusable_workdir_is_reported_and_nothing_is_lost(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('precious')
  result = run_cli('--config=configs/tiny.py', f'--workdir={blocker}/run')
  assert result.returncode != 0
  assert f'workdir {blocker}/run is not usable' in result.stderr
  assert 'Traceback' not in result.stderr
  assert blocker.read_text() == 'precious'


def test_the_1b_preset_is_llama_3_2_1b_with_a_smaller_vocabulary():
  """Llama-3.2-1B's published config.json, imported, sets every model field as the preset
  does but the vocabulary size: its parameters continue training with the preset."""
  from euro_lm.hf import model_config_from_hf  # pylint: disable=import-outside-toplevel

  published = {
      'architectures': ['LlamaForCausalLM'],
      'attention_bias': False,
      'attention_dropout': 0.0,
      'bos_token_id': 128000,
      'eos_token_id': 128001,
      'head_dim': 64,
      'hidden_act': 'silu',
      'hidden_size': 2048,
      'initializer_range': 0.02,
      'intermediate_size': 8192,
      'max_position_embeddings': 131072,
      'mlp_bias': False,
      'model_type': 'llama',
      'num_attention_heads': 32,
      'num_hidden_layers': 16,
      'num_key_value_heads': 8,
      'pretraining_tp': 1,
      'rms_norm_eps': 1e-05,
      'rope_scaling': {
          'factor': 32.0,
          'high_freq_factor': 4.0,
          'low_freq_factor': 1.0,
          'original_max_position_embeddings': 8192,
          'rope_type': 'llama3',
      },
      'rope_theta': 500000.0,
      'tie_word_embeddings': True,
      'torch_dtype': 'bfloat16',
      'use_cache': True,
      'vocab_size': 128256,
  }
  imported = model_config_from_hf(published)
  preset = llama_1b.get_config('gpu').model
  different = {k: (v, preset[k]) for k, v in imported.items() if preset[k] != v}
  assert different == {'vocab_size': (128256, 65536)}
