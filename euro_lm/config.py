"""Config checks that run before anything compiles."""

import math

import jax.numpy as jnp

from euro_lm.errors import ConfigError
from euro_lm.model.attention import IMPLS
from euro_lm.model.decoder import REMAT_POLICIES
from euro_lm.model.layers import head_dim
from euro_lm.sharding import MESH_AXES, MeshError, mesh_shape

COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
SCHEDULES = ('cosine', 'wsd', 'constant')
CORPORA = ('embedded',)


def _check(ok, message):
  if not ok:
    raise ConfigError(message)


def _one_of(config, path, allowed):
  section, field = path.split('.')
  value = config[section][field]
  _check(value in allowed, f'{path}={value!r} is not one of {", ".join(map(repr, allowed))}')


def validate(config, num_devices, process_count=1):
  """Raises ConfigError for a config that cannot run on `num_devices` devices.

  Returns the resolved mesh degrees `{'data': .., 'fsdp': .., 'tensor': ..}` (ICI times
  DCN), so callers see what -1 became.
  """
  m, t, o = config.model, config.train, config.optimizer
  _one_of(config, 'model.attention_impl', IMPLS)
  _one_of(config, 'model.compute_dtype', COMPUTE_DTYPES)
  _one_of(config, 'model.remat_policy', tuple(REMAT_POLICIES))
  _one_of(config, 'optimizer.schedule', SCHEDULES)
  _one_of(config, 'data.corpus', CORPORA)
  _one_of(config, 'distributed.initialize', ('auto', 'always', 'never'))
  _one_of(config, 'train.nonfinite_policy', ('stop',))
  for path in ('model.vocab_size', 'model.num_layers', 'model.embed_dim', 'model.num_heads',
               'model.num_kv_heads', 'model.mlp_dim', 'train.steps',
               'train.global_batch_size', 'train.seq_len', 'train.grad_accum_steps',
               'train.log_every'):
    section, field = path.split('.')
    _check(config[section][field] > 0, f'{path}={config[section][field]} must be positive')
  _check(m.num_heads % m.num_kv_heads == 0,
         f'model.num_heads={m.num_heads} is not divisible by model.num_kv_heads='
         f'{m.num_kv_heads}')
  _check(head_dim(m) % 2 == 0, f'model.head_dim={head_dim(m)} must be even for RoPE')
  _check(m.head_dim or m.embed_dim % m.num_heads == 0,
         f'model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads} '
         '(set model.head_dim explicitly)')
  _check(o.warmup_steps >= 0, f'optimizer.warmup_steps={o.warmup_steps} must be >= 0')
  _check(0 < o.decay_fraction <= 1, f'optimizer.decay_fraction={o.decay_fraction} must be in (0, 1]')

  try:
    ici, dcn = mesh_shape(config.mesh, num_devices)
  except MeshError as e:
    raise ConfigError(str(e)) from None
  degrees = {axis: i * d for axis, i, d in zip(MESH_AXES, ici, dcn)}

  tensor = degrees['tensor']
  for path in ('model.num_heads', 'model.num_kv_heads', 'model.mlp_dim', 'model.vocab_size'):
    value = m[path.split('.')[1]]
    _check(value % tensor == 0,
           f'{path}={value} is not divisible by the tensor-parallel degree {tensor} '
           f'(mesh.tensor={config.mesh.tensor} x mesh.dcn_tensor={config.mesh.dcn_tensor})')
  _check(m.embed_dim % degrees['fsdp'] == 0,
         f'model.embed_dim={m.embed_dim} is not divisible by the fsdp degree {degrees["fsdp"]}')
  batch_ways = degrees['data'] * degrees['fsdp']
  micro_batch, remainder = divmod(t.global_batch_size, t.grad_accum_steps)
  _check(remainder == 0, f'train.global_batch_size={t.global_batch_size} is not divisible by '
                         f'train.grad_accum_steps={t.grad_accum_steps}')
  _check(micro_batch % batch_ways == 0,
         f'train.global_batch_size={t.global_batch_size} / train.grad_accum_steps='
         f'{t.grad_accum_steps} = {micro_batch} is not divisible by the data-parallel size '
         f'{batch_ways} (data={degrees["data"]} x fsdp={degrees["fsdp"]})')
  _check(t.global_batch_size % process_count == 0,
         f'train.global_batch_size={t.global_batch_size} is not divisible by the '
         f'{process_count} processes')
  return degrees


def compute_dtype(config):
  return jnp.dtype(config.model.compute_dtype)


def describe_mesh(degrees):
  return ' x '.join(f'{axis}={size}' for axis, size in degrees.items()) + \
      f' ({math.prod(degrees.values())} devices)'
