"""Attention against an independent float64 numpy reference."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import inputs, jnp_reference, reference

from euro_lm import devices
from euro_lm.model.attention import attention, xla_query_chunks
from euro_lm.model.layers import cached_attention

# The module (the package exports a function of the same name).
attention_lib = importlib.import_module('euro_lm.model.attention')


def reference_attention(q, k, v, segment_ids, causal):
  """float64 numpy: each query head reads kv head h // (H // K); masked softmax."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, length, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(num_heads):
      logits = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(head_dim)
      visible = np.ones((length, length), bool)
      if causal:
        visible &= np.tri(length, dtype=bool)
      if segment_ids is not None:
        seg = np.asarray(segment_ids[b])
        visible &= (seg[:, None] == seg[None, :]) & (seg[:, None] != 0)
      logits = np.where(visible, logits, -np.inf)
      top = logits.max(-1, keepdims=True)
      probs = np.where(visible, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0.0)
      total = probs.sum(-1, keepdims=True)
      # Padding (segment 0) sees no key and outputs zeros.
      out[b, :, h] = (
          np.where(total > 0, probs / np.where(total > 0, total, 1), 0) @ v[b, :, h // group]
      )
  return out


@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('packed', [True, False])
def test_xla_attention_matches_reference(num_heads, num_kv_heads, causal, packed):
  rng = np.random.default_rng(0)
  batch, length, head_dim = 2, 12, 8
  q = rng.standard_normal((batch, length, num_heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, length, num_kv_heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((batch, length, num_kv_heads, head_dim)).astype(np.float32)
  # Row 0: three documents then padding (segment 0); row 1: one document.
  segment_ids = np.array([[1] * 4 + [2] * 3 + [3] * 3 + [0] * 2, [1] * length]) if packed else None
  out = attention(
      jnp.asarray(q),
      jnp.asarray(k),
      jnp.asarray(v),
      segment_ids_BL=None if segment_ids is None else jnp.asarray(segment_ids),
      causal=causal,
      impl='xla',
  )
  np.testing.assert_allclose(
      out, reference_attention(q, k, v, segment_ids, causal), atol=2e-5, rtol=2e-5
  )


@pytest.mark.parametrize(
    'impl,length,causal',
    [('xla', 12, True), ('xla', 12, False), ('xla', 256, True), ('pallas', 128, True)],
)
def test_sliding_window_matches_reference(impl, length, causal):
  """model.sliding_window reaches every implementation: a query sees the `window` latest
  keys of its own document (Mistral's sliding window), and the KV-cache path the same."""
  q, k, v, segment_ids = inputs(4, 2, 64, jnp.float32, length=length, seed=5)
  window = 5 if length == 12 else 24
  out = attention(
      q, k, v, segment_ids_BL=jnp.asarray(segment_ids), causal=causal, impl=impl, window=window
  )
  want = reference(q, k, v, segment_ids, causal, window)
  assert not np.allclose(want, reference(q, k, v, segment_ids, causal, None), atol=1e-3)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  if causal:  # one row of one document, through the cache: slots are positions
    ones = jnp.ones((1, length), bool)
    cached = cached_attention(q[:1], k[:1], v[:1], 0, ones, window)
    full = reference(q[:1], k[:1], v[:1], np.ones((1, length), np.int32), True, window)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('causal', [True, False])
def test_long_xla_attention_matches_reference(causal):
  """At 256 tokens causal attention runs in query chunks (documents crossing chunk edges)."""
  rng = np.random.default_rng(2)
  batch, length, num_heads, num_kv_heads, head_dim = 2, 256, 4, 2, 8
  q = rng.standard_normal((batch, length, num_heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, length, num_kv_heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((batch, length, num_kv_heads, head_dim)).astype(np.float32)
  segment_ids = np.array([[1] * 50 + [2] * 100 + [3] * 90 + [0] * 16, [1] * length])
  run = jax.jit(lambda q, k, v, s: attention(q, k, v, segment_ids_BL=s, causal=causal, impl='xla'))
  out = run(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segment_ids))
  np.testing.assert_allclose(
      out, reference_attention(q, k, v, segment_ids, causal), atol=2e-5, rtol=2e-5
  )


@pytest.mark.parametrize(
    'length,causal,window',
    [(12, True, None), (12, False, None), (256, True, None), (256, False, None), (256, True, 40)],
)
@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 4), (4, 2), (8, 1)])
def test_xla_attention_gradients_match_float64(length, causal, window, num_heads, num_kv_heads):
  """The xla attention's own backward (recomputed per query chunk) against autodiff of a
  dense float64 reference, with documents crossing the chunk edges and a padded row."""
  rng = np.random.default_rng(3)
  make = lambda n: jnp.asarray(rng.standard_normal((2, length, n, 8)), jnp.float32)
  q, k, v = make(num_heads), make(num_kv_heads), make(num_kv_heads)
  first, second = length * 5 // 16, length * 8 // 16
  segment_ids = np.array(
      [[1] * first + [2] * second + [0] * (length - first - second), [0] * length], np.int32
  )
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  loss = lambda *a: jnp.sum(
      attention(
          *a, segment_ids_BL=jnp.asarray(segment_ids), causal=causal, impl='xla', window=window
      )
      * w
  )
  ours = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  with jax.enable_x64(True):
    theirs = jax.jit(
        jax.grad(
            lambda *a: jnp.sum(jnp_reference(*a, segment_ids, causal, window) * w),
            argnums=(0, 1, 2),
        )
    )(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
  assert all(np.all(np.asarray(g)[1] == 0) for g in ours)  # the padded row: no gradient
  assert xla_query_chunks(length, causal) == (8 if causal and length == 256 else 1)


@pytest.mark.parametrize('length,window', [(12, None), (256, 40)])
def test_soft_capped_scores_and_gradients_match_float64(length, window):
  """model.attn_logit_softcap (Gemma 2): the xla attention, its own backward and the KV-cache
  path cap the scaled scores as `cap * tanh(s / cap)`, against a float64 reference; a cap
  below the scores' size changes the output."""
  cap = 0.5
  q, k, v, segment_ids = inputs(4, 2, 8, jnp.float32, length=length, seed=6)
  w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)
  run = lambda *a: attention(
      *a, segment_ids_BL=jnp.asarray(segment_ids), impl='xla', window=window, softcap=cap
  )
  out = jax.jit(run)(q, k, v)
  ours = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  with jax.enable_x64(True):
    q64, k64, v64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    ref = lambda *a, c=cap: jnp_reference(*a, segment_ids, True, window, c)
    want = ref(q64, k64, v64)
    theirs = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q64, k64, v64)
    uncapped = ref(q64, k64, v64, c=0.0)
  assert np.abs(np.asarray(want - uncapped)).max() > 0.1
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
  ones = jnp.ones((1, length), bool)
  cached = cached_attention(q[:1], k[:1], v[:1], 0, ones, window, 8**-0.5, cap)
  with jax.enable_x64(True):
    full = jnp_reference(
        q64[:1], k64[:1], v64[:1], np.ones((1, length), np.int32), True, window, cap
    )
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=2e-5)


def test_soft_caps_go_to_the_attentions_that_take_them():
  """cuDNN does not soft-cap: naming it with a cap is one error naming the fields; every
  kernel set does. 'auto' takes the Triton kernels on NVIDIA GPUs before Hopper (where
  cuDNN would win without a cap), the Hopper kernels on Hopper, the TPU kernels on TPUs and
  xla on CPUs."""
  with pytest.raises(attention_lib.AttentionError, match=r"impl='cudnn' .*attn_logit_softcap"):
    attention_lib.resolve(
        'cudnn', dtype='bfloat16', length=4096, head_dim=128, device=None, softcap=50.0
    )
  for device, want in (
      (devices.Device('cuda'), attention_lib.AttentionChoice('pallas', 'gpu')),
      (
          devices.Device('cuda', hopper=True),
          attention_lib.AttentionChoice('pallas', 'mosaic_gpu'),
      ),
      (devices.Device('tpu'), attention_lib.AttentionChoice('pallas', 'tpu')),
      (devices.Device('cpu'), attention_lib.AttentionChoice('xla')),
  ):
    choice = attention_lib.resolve(
        'auto', dtype='bfloat16', length=4096, head_dim=128, device=device, softcap=50.0
    )
    assert choice == want, device
  uncapped = attention_lib.resolve(
      'auto', dtype='bfloat16', length=4096, head_dim=128, device=devices.Device('cuda')
  )
  assert uncapped == attention_lib.AttentionChoice('cudnn')  # cuDNN wins where it can run


def test_xla_attention_bfloat16_gradients():
  """bf16 inputs: the backward accumulates in float32 and returns the inputs' dtype."""
  rng = np.random.default_rng(4)
  length = 256
  q, k, v = (jnp.asarray(rng.standard_normal((1, length, h, 16)), jnp.float32) for h in (4, 2, 2))
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  grad = jax.jit(
      jax.grad(
          lambda *a: jnp.sum(attention(*a, impl='xla').astype(jnp.float32) * w), argnums=(0, 1, 2)
      )
  )
  grads = lambda dtype: grad(*(x.astype(dtype) for x in (q, k, v)))
  for low, high in zip(grads(jnp.bfloat16), grads(jnp.float32)):
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(low, np.float32), high, atol=0.05 * float(jnp.max(jnp.abs(high)))
    )


def test_gqa_equals_mha_with_repeated_kv():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((2, 10, 8, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 10, 2, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 10, 2, 16)), jnp.float32)
  gqa = attention(q, k, v, impl='xla')
  mha = attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), impl='xla')
  np.testing.assert_allclose(gqa, mha, atol=1e-6)


def test_unknown_impl_is_rejected():
  x = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
    attention(x, x, x, impl='flash')


# --- Pallas kernels on a device mesh: each device runs the kernel on its own shard -----


def _mesh_and_rules(heads_axis='tensor'):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top

  from configs import base  # pylint: disable=g-import-not-at-top
  from euro_lm.sharding import logical_rules  # pylint: disable=g-import-not-at-top

  rules = dict(logical_rules(base.get_config().mesh))
  rules['heads'] = heads_axis
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  return mesh, nn.logical_axis_rules(tuple(rules.items()))


def _sharded(mesh, x, *spec):
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  sharding = NamedSharding(mesh, PartitionSpec(*spec))
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.device_put(x, sharding)


@pytest.mark.parametrize('packed', [False, True])
def test_pallas_kernels_see_only_their_devices_shard(packed):
  """Lowered for CUDA on a data 2 x fsdp 2 x tensor 2 mesh, the Triton kernels take each
  device's 2 of 8 rows and 4 of 8 heads (2 of 4 kv heads). A bare custom call would take
  the whole arrays: XLA's partitioner cannot split it, so it gathers them."""
  import functools  # pylint: disable=g-import-not-at-top

  from euro_lm.kernels import flash_attention  # pylint: disable=g-import-not-at-top
  from euro_lm.model.attention import per_device  # pylint: disable=g-import-not-at-top

  mesh, rules = _mesh_and_rules()
  q = _sharded(mesh, jax.ShapeDtypeStruct((8, 256, 8, 64), jnp.bfloat16), ('data', 'fsdp'))
  kv = _sharded(mesh, jax.ShapeDtypeStruct((8, 256, 4, 64), jnp.bfloat16), ('data', 'fsdp'))
  seg = _sharded(mesh, jax.ShapeDtypeStruct((8, 256), jnp.int32), ('data', 'fsdp'))
  kernel = functools.partial(flash_attention, interpret=False, backend='gpu')

  def loss(q, k, v, s):
    return per_device(kernel, q, k, v, s if packed else None).astype(jnp.float32).sum()

  with jax.set_mesh(mesh), rules:
    text = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        .trace(q, kv, kv, seg)
        .lower(lowering_platforms=('cuda',))
        .as_text()
    )
  calls = [line for line in text.splitlines() if 'xla.gpu.triton' in line]
  assert len(calls) == 3
  for line in calls:
    assert 'tensor<2x256x4x64xbf16>' in line and 'tensor<2x256x2x64xbf16>' in line
    assert '8x256x8x64' not in line and 'x256x8x64xbf16' not in line


@pytest.mark.parametrize('heads_axis', ['tensor', None])
def test_sharded_pallas_attention_matches_xla(heads_axis):
  """Values and gradients of impl='pallas' (interpreted) on a 2 x 2 x 2 mesh against the
  xla reference on one device: with the heads split over 'tensor', and with them whole
  (the 'tensor' axis then replicates the kernel's work)."""
  mesh, rules = _mesh_and_rules(heads_axis)
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (8, 128, 8, 64), jnp.float32)
  k, v = (jax.random.normal(x, (8, 128, 4, 64), jnp.float32) for x in keys[1:])
  seg = jnp.asarray(np.repeat([[1] * 50 + [2] * 70 + [0] * 8], 8, 0), jnp.int32)

  def loss(impl):
    return lambda q, k, v, s: (attention(q, k, v, segment_ids_BL=s, impl=impl) * jnp.cos(q)).sum()

  expected = jax.jit(jax.value_and_grad(loss('xla'), argnums=(0, 1, 2)))(q, k, v, seg)
  with jax.set_mesh(mesh), rules:
    spec = ('data', 'fsdp'), None, heads_axis
    args = (
        _sharded(mesh, q, *spec),
        _sharded(mesh, k, *spec),
        _sharded(mesh, v, *spec),
        _sharded(mesh, seg, ('data', 'fsdp')),
    )
    got = jax.jit(jax.value_and_grad(loss('pallas'), argnums=(0, 1, 2)))(*args)
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  for ours, theirs in zip(got[1], expected[1]):
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def _resolved(impl, length, head_dim, dtype, device, pallas_backend='auto'):
  choice = attention_lib.resolve(
      impl, pallas_backend, dtype=dtype, length=length, head_dim=head_dim, device=device
  )
  return choice.impl if choice.impl != 'pallas' else f'pallas:{choice.backend}'


CPU, TPU = devices.Device('cpu'), devices.Device('tpu')
NVIDIA, HOPPER, AMD = (
    devices.Device('cuda'),
    devices.Device('cuda', hopper=True),
    devices.Device('rocm'),
)


@pytest.mark.parametrize(
    'length,head_dim,dtype,device,backend,expected',
    [
        (4096, 128, jnp.bfloat16, CPU, 'auto', 'xla'),  # on a CPU: always xla
        (4096, 128, jnp.bfloat16, None, 'auto', 'xla'),  # device unknown: as on a CPU
        # An NVIDIA GPU other than Hopper: cuDNN for 16 bits, where the kernels would be Triton's.
        (4096, 128, jnp.bfloat16, NVIDIA, 'auto', 'cudnn'),
        (192, 64, jnp.float32, NVIDIA, 'auto', 'pallas:gpu'),  # cuDNN takes 16 bits only
        (4096, 256, jnp.bfloat16, NVIDIA, 'auto', 'pallas:gpu'),  # and head_dim <= 128
        (200, 64, jnp.float32, NVIDIA, 'auto', 'xla'),  # Triton blocks are 64
        # Named kernels are taken where they fit; else cuDNN for 16 bits, xla for float32.
        (256, 64, jnp.bfloat16, NVIDIA, 'mosaic_gpu', 'pallas:mosaic_gpu'),
        (256, 64, jnp.bfloat16, NVIDIA, 'gpu', 'pallas:gpu'),
        (192, 64, jnp.bfloat16, NVIDIA, 'mosaic_gpu', 'cudnn'),  # Hopper blocks are 128
        (256, 64, jnp.float32, NVIDIA, 'mosaic_gpu', 'xla'),  # Hopper kernels: 16-bit
        # Hopper: its own kernels from 4k tokens, where they beat cuDNN; cuDNN below.
        (4096, 128, jnp.bfloat16, HOPPER, 'auto', 'pallas:mosaic_gpu'),
        (2048, 128, jnp.bfloat16, HOPPER, 'auto', 'cudnn'),
        # AMD: no cuDNN, so the Triton kernels wherever they fit.
        (2048, 128, jnp.bfloat16, AMD, 'auto', 'pallas:gpu'),
        (200, 64, jnp.bfloat16, AMD, 'auto', 'xla'),
        (192, 64, jnp.float32, TPU, 'tpu', 'xla'),  # TPU blocks are 128
        (256, 64, jnp.float32, TPU, 'tpu', 'pallas:tpu'),
        (256, 64, jnp.float32, TPU, 'auto', 'pallas:tpu'),
    ],
)
def test_auto_takes_what_ran_fastest_on_each_device(
    length, head_dim, dtype, device, backend, expected
):
  assert _resolved('auto', length, head_dim, dtype, device, backend) == expected


@pytest.mark.parametrize(
    'impl,backend,length,dtype,device,expected',
    [
        ('pallas', 'auto', 4096, jnp.bfloat16, HOPPER, 'pallas:mosaic_gpu'),
        ('pallas', 'auto', 2048, jnp.bfloat16, HOPPER, 'pallas:gpu'),
        ('pallas', 'auto', 4096, jnp.bfloat16, TPU, 'pallas:tpu'),
        ('pallas', 'auto', 4096, jnp.float32, CPU, 'pallas:gpu'),  # interpreted
        ('cudnn', 'auto', 4096, jnp.bfloat16, NVIDIA, 'cudnn'),
        ('xla', 'mosaic_gpu', 4096, jnp.float32, AMD, 'xla'),
    ],
)
def test_explicit_choices_resolve_to_what_runs(impl, backend, length, dtype, device, expected):
  assert _resolved(impl, length, 128, dtype, device, backend) == expected


@pytest.mark.parametrize(
    'impl,backend,length,head_dim,dtype,device,message',
    [
        ('cudnn', 'auto', 256, 64, jnp.float32, NVIDIA, "'cudnn' needs model.compute_dtype"),
        ('cudnn', 'auto', 256, 256, jnp.bfloat16, NVIDIA, "'cudnn' needs model.head_dim <= 128"),
        ('cudnn', 'auto', 256, 64, jnp.bfloat16, AMD, 'needs an NVIDIA GPU; this is a rocm run'),
        ('pallas', 'mosaic_gpu', 256, 64, jnp.float32, HOPPER, "'mosaic_gpu' needs model.comp"),
        ('pallas', 'mosaic_gpu', 256, 96, jnp.bfloat16, HOPPER, 'head_dim 64 or 128, not 96'),
        ('pallas', 'mosaic_gpu', 256, 64, jnp.bfloat16, AMD, 'cannot run on this rocm run'),
        ('pallas', 'tpu', 256, 64, jnp.bfloat16, NVIDIA, 'cannot run on this cuda run'),
        ('pallas', 'auto', 4000, 64, jnp.bfloat16, TPU, 'seq_len=4000 must be a multiple of 128'),
        ('sdpa', 'auto', 256, 64, jnp.bfloat16, CPU, "attention_impl='sdpa' is not one of"),
        ('pallas', 'triton', 256, 64, jnp.bfloat16, CPU, "pallas_backend='triton' is not one of"),
    ],
)
def test_what_cannot_run_is_named(impl, backend, length, head_dim, dtype, device, message):
  with pytest.raises(attention_lib.AttentionError, match=re.escape(message)):
    _resolved(impl, length, head_dim, dtype, device, backend)


def test_the_layers_run_what_the_resolver_says(monkeypatch):
  """attention() asks `resolve` on the device it is given, and runs that implementation."""
  called = []
  monkeypatch.setattr(attention_lib, '_cudnn_attention', lambda *a: called.append('cudnn'))
  monkeypatch.setattr(attention_lib, '_xla_attention', lambda *a: called.append('xla'))
  q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
  attention(q, q, q, impl='auto', device=NVIDIA)
  attention(q, q, q, impl='auto', device=CPU)
  attention(q, q, q, impl='auto')  # this CPU
  assert called == ['cudnn', 'xla', 'xla']
