"""Config checks that run before anything compiles."""

import math

from euro_lm.errors import ConfigError
from euro_lm.kernels.flash_attention import BACKENDS as FLASH_BACKENDS, length_multiple
from euro_lm.model.attention import IMPLS
from euro_lm.model.decoder import REMAT_POLICIES
from euro_lm.model.layers import head_dim
from euro_lm.sharding import MESH_AXES, MeshError, batch_mesh_axes, logical_rules, mesh_shape

COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
SCHEDULES = ('cosine', 'wsd', 'constant')
CORPORA = ('embedded', 'prepared')


def device_platform(device):
  """'cpu', 'tpu', 'cuda' or 'rocm': JAX calls both GPU kinds 'gpu', and the runtime tells
  them apart."""
  if device.platform != 'gpu':
    return device.platform
  return 'rocm' if 'rocm' in device.client.platform_version.lower() else 'cuda'


def _check(ok, message):
  if not ok:
    raise ConfigError(message)


def _one_of(config, path, allowed):
  section, field = path.split('.')
  value = config[section][field]
  _check(value in allowed, f'{path}={value!r} is not one of {", ".join(map(repr, allowed))}')


def validate(config, num_devices, process_count=1, platform=None):
  """Raises ConfigError for a config that cannot run on `num_devices` devices of
  `platform` ('cpu', 'cuda', 'rocm', 'tpu', as `device_platform` says; 'gpu' for either
  GPU; None skips the platform checks) in `process_count` processes.

  Returns the resolved mesh degrees `{'data': .., 'fsdp': .., 'tensor': ..}` (ICI times
  DCN), so callers see what -1 became.
  """
  m, t, o = config.model, config.train, config.optimizer
  _one_of(config, 'model.attention_impl', IMPLS)
  _one_of(config, 'model.pallas_backend', ('auto',) + FLASH_BACKENDS)
  _one_of(config, 'model.compute_dtype', COMPUTE_DTYPES)
  _one_of(config, 'model.remat_policy', tuple(REMAT_POLICIES))
  _one_of(config, 'optimizer.schedule', SCHEDULES)
  _one_of(config, 'data.corpus', CORPORA)
  _one_of(config, 'data.mixture', ('natural', 'temperature', 'unimax', 'explicit', 'groups'))
  _one_of(config, 'distributed.initialize', ('auto', 'always', 'never'))
  _one_of(config, 'train.nonfinite_policy', ('stop', 'skip'))
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
  for path in ('model.loss_chunk_length', 'optimizer.warmup_steps', 'train.eval_every',
               'train.eval_batches', 'train.checkpoint_every', 'train.checkpoint_every_minutes',
               'train.keep_checkpoints_every', 'train.skip_grad_norm_above',
               'train.profile_start_step'):
    section, field = path.split('.')
    _check(config[section][field] >= 0, f'{path}={config[section][field]} must be >= 0')
  _check(t.keep_checkpoints >= 1, f'train.keep_checkpoints={t.keep_checkpoints} must be >= 1')
  _check(t.profile_steps >= 1, f'train.profile_steps={t.profile_steps} must be >= 1')
  _check(t.max_skipped_in_a_row >= 1,
         f'train.max_skipped_in_a_row={t.max_skipped_in_a_row} must be >= 1')
  _check(not t.skip_grad_norm_above or t.nonfinite_policy == 'skip',
         f'train.skip_grad_norm_above={t.skip_grad_norm_above} needs '
         "train.nonfinite_policy='skip'")
  if m.attention_impl == 'cudnn':
    _check(m.compute_dtype in ('bfloat16', 'float16'),
           f"model.attention_impl='cudnn' needs model.compute_dtype bfloat16 or float16, "
           f'not {m.compute_dtype!r}')
    _check(platform in (None, 'gpu', 'cuda'),
           f"model.attention_impl='cudnn' needs an NVIDIA GPU; this is a {platform} run "
           + ("(use 'pallas', euro_lm's Triton kernels, or 'xla')" if platform == 'rocm'
              else "(use 'xla')"))
  if m.attention_impl == 'pallas':
    backend = m.pallas_backend
    if backend == 'auto':
      backend = 'tpu' if platform == 'tpu' else 'gpu'
    runs_on = {'gpu': ('gpu', 'cuda', 'rocm'), 'mosaic_gpu': ('gpu', 'cuda'), 'tpu': ('tpu',)}
    _check(platform in (None, 'cpu') + runs_on[backend],  # a CPU interprets any of them
           f"model.pallas_backend={backend!r} cannot run on this {platform} run (use 'auto')")
    if backend == 'mosaic_gpu':
      _check(m.compute_dtype in ('bfloat16', 'float16'),
             f"model.pallas_backend='mosaic_gpu' needs model.compute_dtype bfloat16 or "
             f'float16, not {m.compute_dtype!r}')
      _check(head_dim(m) in (64, 128),
             f"model.pallas_backend='mosaic_gpu' needs model.head_dim 64 or 128, not "
             f'{head_dim(m)}')
    block = length_multiple(head_dim(m), backend)
    _check(t.seq_len % block == 0,
           f"train.seq_len={t.seq_len} must be a multiple of {block} for model.attention_impl="
           "'pallas' (the kernels' block size)")
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
  batch_axes = batch_mesh_axes(logical_rules(config.mesh))
  batch_ways = math.prod(degrees[a] for a in batch_axes)
  describe_batch_ways = ' x '.join(f'{a}={degrees[a]}' for a in batch_axes) or 'unsplit'
  micro_batch, remainder = divmod(t.global_batch_size, t.grad_accum_steps)
  _check(remainder == 0, f'train.global_batch_size={t.global_batch_size} is not divisible by '
                         f'train.grad_accum_steps={t.grad_accum_steps}')
  _check(micro_batch % batch_ways == 0,
         f'train.global_batch_size={t.global_batch_size} / train.grad_accum_steps='
         f'{t.grad_accum_steps} = {micro_batch} is not divisible by the data-parallel size '
         f'{batch_ways} ({describe_batch_ways})')
  # Each process loads its own rows, so processes must not share a batch shard.
  _check(batch_ways % process_count == 0,
         f'the batch is split {batch_ways} ways ({describe_batch_ways}), which does not give '
         f'each of the {process_count} processes its own rows; raise mesh.data/mesh.fsdp '
         '(or their dcn_ degrees) instead of tensor parallelism across processes')
  dcn_size = math.prod(dcn)
  _check(platform in (None, 'tpu') or dcn_size in (1, process_count),
         f'mesh.dcn_* multiply to {dcn_size} but there are {process_count} processes; on GPUs '
         'each process (node) is one DCN granule')
  return degrees
