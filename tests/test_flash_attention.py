"""The Pallas flash attention kernel, in interpret mode, against a float64 reference; and its
lowering for NVIDIA GPUs (Triton)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import inputs, jnp_reference, reference

from euro_lm import devices
from euro_lm.kernels import (
    GPU_BLOCK_SIZES,
    BlockSizes,
    default_backend,
    flash_attention,
    gpu_block_sizes,
    length_multiple,
)
from euro_lm.kernels.flash.blocks import Static, key_ranges, query_ranges, visible_key_spans

SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _visibility_and_heads():
  """Every (causal, window) with every head grouping; each visibility meets two groupings
  and each grouping two visibilities here, the rest of the grid with `-m slow`."""
  visibilities = [(True, None), (False, None), (True, 8), (False, 8)]
  groupings = [(2, 2), (4, 2), (8, 2), (8, 1)]
  for i, visibility in enumerate(visibilities):
    for j, grouping in enumerate(groupings):
      fast = (j - i) % 4 in (0, 1)
      yield pytest.param(*visibility, *grouping, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize('causal,window,heads,kv_heads', list(_visibility_and_heads()))
def test_forward_and_gradients_match_float64(causal, window, heads, kv_heads):
  q, k, v, seg = inputs(heads, kv_heads, 16, jnp.float32)
  out = flash_attention(
      q, k, v, segment_ids=jnp.asarray(seg), causal=causal, window=window, block_sizes=SMALL_BLOCKS
  )
  np.testing.assert_allclose(out, reference(q, k, v, seg, causal, window), atol=2e-5)
  assert np.all(np.asarray(out)[1] == 0)  # the fully padded row: zeros, not NaN

  # Gradients of <out, w>: a plain-jnp reference differentiated by JAX in float64.
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  ours = jax.grad(
      lambda *a: jnp.sum(
          flash_attention(
              *a,
              segment_ids=jnp.asarray(seg),
              causal=causal,
              window=window,
              block_sizes=SMALL_BLOCKS,
          )
          * w
      ),
      argnums=(0, 1, 2),
  )(q, k, v)
  with jax.enable_x64(True):
    theirs = jax.grad(
        lambda *a: jnp.sum(jnp_reference(*a, seg, causal, window) * w), argnums=(0, 1, 2)
    )(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=5e-5)


@pytest.mark.parametrize('causal,window', [(True, None), (False, None), (True, 40), (False, 40)])
def test_unmasked_blocks_match_float64(causal, window):
  # Long documents, so most visited blocks are seen whole and run without a mask.
  seg = np.array([[1] * 64, [1] * 32 + [2] * 32], np.int32)
  q, k, v, seg = inputs(4, 2, 16, jnp.float32, segment_ids=seg)
  ranges = key_ranges(Static(causal, 1.0, window, SMALL_BLOCKS, True), jnp.asarray(seg), 16, 16)
  assert int(jnp.sum(ranges.full_hi - ranges.full_lo)) >= 4
  fn = lambda *a: flash_attention(
      *a, segment_ids=jnp.asarray(seg), causal=causal, window=window, block_sizes=SMALL_BLOCKS
  )
  np.testing.assert_allclose(fn(q, k, v), reference(q, k, v, seg, causal, window), atol=2e-5)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  ours = jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))(q, k, v)
  with jax.enable_x64(True):
    theirs = jax.grad(
        lambda *a: jnp.sum(jnp_reference(*a, seg, causal, window) * w), argnums=(0, 1, 2)
    )(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=5e-5)


def _dense_visibility(seg, causal, window):
  """[B, L, L] numpy: query i sees key j (the reference's mask)."""
  index = np.arange(seg.shape[1])
  visible = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if causal:
    visible &= index[:, None] >= index[None, :]
  if window:
    visible &= index[:, None] - index[None, :] < window
    if not causal:
      visible &= index[None, :] - index[:, None] < window
  return visible


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('window', [None, 1, 20, 50])
@pytest.mark.parametrize('block_q,block_k', [(16, 16), (16, 32), (32, 16)])
def test_block_ranges_cover_every_visible_pair_and_only_mask_partial_blocks(
    causal, window, block_q, block_k
):
  rng = np.random.default_rng(block_q + 3 * block_k + (window or 0))
  rows = [np.ones(128, np.int32), np.zeros(128, np.int32)]
  for _ in range(6):  # random documents, some with padding at the end
    sizes = rng.integers(1, 70, size=8)
    ids = np.repeat(np.arange(1, 9), sizes)[:128]
    ids = np.pad(ids, (0, 128 - ids.size))
    rows.append(ids)
  seg = np.stack(rows).astype(np.int32)
  visible = _dense_visibility(seg, causal, window)
  static = Static(causal, 1.0, window, SMALL_BLOCKS, True)
  nq, nk = 128 // block_q, 128 // block_k
  tiles = visible.reshape(len(seg), nq, block_q, nk, block_k)
  any_visible, all_visible = tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))  # [B, nq, nk]
  for ranges, any_pairs, all_pairs in (
      (key_ranges(static, jnp.asarray(seg), block_q, block_k), any_visible, all_visible),
      (
          query_ranges(static, jnp.asarray(seg), block_q, block_k),
          any_visible.transpose(0, 2, 1),
          all_visible.transpose(0, 2, 1),
      ),
  ):
    lo, full_lo, full_hi, hi = (np.asarray(x)[:, :, None] for x in ranges)
    other = np.arange(any_pairs.shape[2])[None, None, :]
    visited = (other >= lo) & (other < hi)
    unmasked = (other >= full_lo) & (other < full_hi)
    # Visited: from the first to the last block with a visible pair (nothing if none).
    seen = any_pairs.any(axis=2)
    first_seen = np.argmax(any_pairs, axis=2)
    last_seen = any_pairs.shape[2] - np.argmax(any_pairs[:, :, ::-1], axis=2)
    np.testing.assert_array_equal(np.where(seen, lo[..., 0], 0), np.where(seen, first_seen, 0))
    np.testing.assert_array_equal(np.where(seen, hi[..., 0], 0), np.where(seen, last_seen, 0))
    assert np.all(seen | (lo[..., 0] == hi[..., 0]))
    assert not np.any(visited[1])  # the fully padded row
    np.testing.assert_array_equal(unmasked, all_pairs)  # exactly the whole blocks go unmasked
    assert np.all((lo <= full_lo) & (full_lo <= full_hi) & (full_hi <= hi))

  # From numpy ids (how calls without ids get constant ranges): the same, in numpy.
  for ranges in (key_ranges, query_ranges):
    from_numpy = ranges(static, seg, block_q, block_k).stacked()
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.int32
    np.testing.assert_array_equal(
        from_numpy, ranges(static, jnp.asarray(seg), block_q, block_k).stacked()
    )
  for ours, theirs in zip(
      visible_key_spans(static, seg), visible_key_spans(static, jnp.asarray(seg))
  ):
    assert isinstance(ours, np.ndarray) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    'causal,window,heads,kv_heads,layout',
    [(True, None, 4, 2, 'padded'), (False, 24, 2, 1, 'long'), (True, None, 2, 2, 'long')],
)
def test_soft_capped_scores_and_gradients_match_float64(causal, window, heads, kv_heads, layout):
  """Gemma 2's cap on the scaled scores, `cap * tanh(s / cap)`, in the Triton kernels' masked
  and whole blocks and their backward, against the float64 reference; a cap below the
  scores' size changes the output."""
  cap = 0.5
  seg = np.array([[1] * 64, [1] * 40 + [2] * 24], np.int32) if layout == 'long' else None
  q, k, v, seg = inputs(heads, kv_heads, 16, jnp.float32, segment_ids=seg)
  run = lambda *a: flash_attention(
      *a,
      segment_ids=jnp.asarray(seg),
      causal=causal,
      window=window,
      softcap=cap,
      block_sizes=SMALL_BLOCKS,
  )
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  out = run(q, k, v)
  ours = jax.grad(lambda *a: jnp.sum(run(*a) * w), argnums=(0, 1, 2))(q, k, v)
  with jax.enable_x64(True):
    ref = lambda *a, c=cap: jnp_reference(*a, seg, causal, window, c)
    q64, k64, v64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    want = ref(q64, k64, v64)
    theirs = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q64, k64, v64)
    assert np.abs(np.asarray(want - ref(q64, k64, v64, c=0.0))).max() > 0.1
  np.testing.assert_allclose(out, want, atol=2e-5)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_a_negative_soft_cap_is_refused():
  q, k, v, _ = inputs(2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match='soft cap >= 0 .*, not -1.0'):
    flash_attention(q, k, v, softcap=-1.0, block_sizes=SMALL_BLOCKS)


def test_a_scale_that_is_not_positive_is_refused():
  q, k, v, _ = inputs(2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match='positive logit scale, not -0.5'):
    flash_attention(q, k, v, scale=-0.5, block_sizes=SMALL_BLOCKS)


@pytest.mark.parametrize('dim', [64, 128])
@pytest.mark.parametrize('dtype,atol', [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_head_dims_and_dtypes(dim, dtype, atol):
  q, k, v, seg = inputs(4, 2, dim, dtype)
  out = flash_attention(q, k, v, segment_ids=jnp.asarray(seg), block_sizes=SMALL_BLOCKS)
  assert out.dtype == dtype
  np.testing.assert_allclose(
      np.asarray(out, np.float32), reference(q, k, v, seg, True, None), atol=atol
  )


def test_lengths_that_do_not_fit_the_blocks_are_refused():
  q, k, v, _ = inputs(2, 2, 16, jnp.float32, length=40)
  with pytest.raises(ValueError, match='sequence length 40 is not a multiple of block_q=16'):
    flash_attention(q, k, v, block_sizes=SMALL_BLOCKS)


@pytest.mark.parametrize('softcap', [0.0, 0.5])  # 0.5: Gemma 2's score cap, made to bite
def test_model_trains_the_same_with_pallas_and_xla(softcap):
  from configs import tiny
  from euro_lm.model import Decoder

  config = tiny.get_config().model
  config.update(
      vocab_size=64,
      num_layers=1,
      embed_dim=32,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      mlp_dim=48,
      attn_logit_softcap=softcap,
  )
  tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 64)
  segment_ids = jnp.asarray(np.repeat([[1, 2, 3, 4]], 16, axis=1).repeat(2, 0))
  positions = jnp.tile(jnp.arange(16), (2, 4))

  def loss_and_grads(impl):
    config.attention_impl = impl
    model = Decoder(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens)['params'])
    # Scores 64x their initial size, so that the cap changes the loss (by 1%).
    attention = params['layers']['attention']
    attention.update(wq=attention['wq'] * 8, wk=attention['wk'] * 8)
    loss = lambda p: jnp.mean(model.apply({'params': p}, tokens, segment_ids, positions) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)  # op by op, the kernels take a minute

  (xla_loss, xla_grads), (pallas_loss, pallas_grads) = loss_and_grads('xla'), loss_and_grads(
      'pallas'
  )
  np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pallas_grads, xla_grads
  )

  # model.pallas_backend reaches the resolver: it refuses the TPU kernels a 64-token row
  # (their blocks are multiples of 128), which the Triton ones above took.
  config.pallas_backend = 'tpu'
  with pytest.raises(ValueError, match="seq_len=64 must be a multiple of 128 .*the 'tpu' kernels"):
    loss_and_grads('pallas')


@pytest.mark.parametrize('platform', ['cuda', 'rocm'])  # rocm: LUMI's MI250X, not yet run
@pytest.mark.parametrize('dim,softcap', [(64, 0.0), (128, 0.0), (128, 50.0)])
def test_forward_and_backward_lower_for_nvidia_and_amd_gpus(dim, softcap, platform):
  q = jax.ShapeDtypeStruct((2, 512, 8, dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, 2, dim), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 512), jnp.int32)

  def loss(q, k, v, s):
    return (
        flash_attention(q, k, v, segment_ids=s, window=256, softcap=softcap, interpret=False)
        .astype(jnp.float32)
        .sum()
    )

  lowered = (
      jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      .trace(q, kv, kv, seg)
      .lower(lowering_platforms=(platform,))
  )
  text = lowered.as_text()
  for kernel in ('euro_lm_flash_forward', 'euro_lm_flash_dkv', 'euro_lm_flash_dq'):
    assert kernel in text
  assert text.count('xla.gpu.triton') == 3


@pytest.mark.parametrize('bwd', [(None, None), (2, 1)])
def test_backward_kernels_take_their_own_warps_and_stages(bwd):
  blocks = BlockSizes(num_warps=8, num_stages=3, num_warps_bwd=bwd[0], num_stages_bwd=bwd[1])
  q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)

  def loss(q, k, v):
    return flash_attention(q, k, v, block_sizes=blocks, interpret=False).astype(jnp.float32).sum()

  text = (
      jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      .trace(q, q, q)
      .lower(lowering_platforms=('cuda',))
      .as_text()
  )
  expected = {'forward': (8, 3), 'dkv': bwd if bwd[0] else (8, 3), 'dq': bwd if bwd[0] else (8, 3)}
  calls = [line for line in text.splitlines() if 'xla.gpu.triton' in line]
  assert len(calls) == 3
  for kernel, (warps, stages) in expected.items():
    (line,) = [c for c in calls if f'name = "euro_lm_flash_{kernel}"' in c]
    assert f'num_warps = {warps} : i32' in line and f'num_stages = {stages} : i32' in line


@pytest.mark.parametrize(
    'backend,causal,window,dtype',
    [
        ('gpu', False, 8, jnp.float32),
        ('mosaic_gpu', True, 40, jnp.bfloat16),
        ('tpu', True, 200, jnp.float32),
    ],
)
def test_no_segment_ids_is_one_document_per_row(backend, causal, window, dtype):
  # Without ids the block ranges are built while tracing (constants); with ids of ones,
  # on the device. Both must give the same bits, forward and backward.
  length, block = (256, 128) if backend == 'tpu' else (128, 64)  # TPU blocks: 128s
  q, k, v, _ = inputs(2, 1, 64, dtype, length=length)
  w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), dtype)
  blocks = BlockSizes(block_q=block, block_k=block, block_q_bwd=block, block_k_bwd=block)

  def loss_and_grads(segment_ids):
    loss = lambda *a: jnp.sum(
        (
            flash_attention(
                *a,
                segment_ids=segment_ids,
                causal=causal,
                window=window,
                block_sizes=blocks,
                backend=backend,
            )
            * w
        ).astype(jnp.float32)
    )
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  without_ids = loss_and_grads(None)
  for a, b in zip(
      jax.tree.leaves(without_ids),
      jax.tree.leaves(loss_and_grads(jnp.ones(q.shape[:2], jnp.int32))),
  ):
    np.testing.assert_array_equal(a, b)
  with jax.enable_x64(True):
    expected = jax.grad(
        lambda *a: jnp.sum(jnp_reference(*a, np.ones(q.shape[:2], np.int32), causal, window) * w),
        argnums=(0, 1, 2),
    )(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for ours, theirs in zip(without_ids[1], expected):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs)
    error = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert error < (2e-2 if dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize('backend', ['gpu', 'mosaic_gpu', 'tpu'])
def test_without_segment_ids_no_block_ranges_are_computed_per_call(backend):
  # Each row one document: the ranges depend on the shape alone, so they are built while
  # tracing; with segment ids the program scans the ids (cummax, cummin) in every call.
  q = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 512), jnp.int32)

  def program(*args):
    loss = (
        lambda q, k, v, s=None: flash_attention(
            q, k, v, segment_ids=s, window=256, backend=backend, interpret=False
        )
        .astype(jnp.float32)
        .sum()
    )
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args))

  assert 'cummax' in program(q, q, q, seg) and 'cummin' in program(q, q, q, seg)
  assert 'cummax' not in program(q, q, q) and 'cummin' not in program(q, q, q)


def test_the_benchmarks_capped_table_runs_capped_implementations_only():
  """`python -m euro_lm.bench.attention --softcap=...`: its reference and euro_lm's kernels
  cap (against the float64 reference); cuDNN and JAX's Hopper kernel, which cannot, are
  left out."""
  from euro_lm.bench import attention as bench

  assert set(bench.implementations()) - set(bench.implementations(0.5)) == {
      'cudnn',
      'jax_mosaic_gpu',
  }
  q, k, v, _ = inputs(2, 2, 16, jnp.float32)
  seg = np.ones(q.shape[:2], np.int32)
  with jax.enable_x64(True):
    want = jnp_reference(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)), seg, True, None, 0.5)
    uncapped = jnp_reference(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)), seg, True, None)
  assert np.abs(np.asarray(want - uncapped)).max() > 0.1
  capped = bench.implementations(0.5)
  for name in ('xla', 'pallas'):
    np.testing.assert_allclose(capped[name](q, k, v), want, atol=2e-5, err_msg=name)


def test_packed_benchmark_counts_the_blocks_documents_skip():
  from euro_lm.bench import attention as bench
  # n equal documents of m blocks: causal visits N(N+1)/2 block pairs (N = n m), documents
  # n m(m+1)/2, a fraction (m + 1) / (n m + 1).
  eight_docs = np.repeat(np.arange(1, 9), 128)[None]
  assert bench.visited_fraction(eight_docs, 64, 64) == 3 / 17
  assert bench.visited_fraction(np.repeat(np.arange(1, 9), 1024)[None], 64, 64) == 17 / 129
  assert bench.visited_fraction(np.ones((1, 1024), np.int32), 64, 64) == 1
  segment_ids = bench.packed_segment_ids(2, 8192, 1024)
  assert segment_ids.shape == (2, 8192) and segment_ids.min() == 1
  sizes = np.unique(segment_ids[0], return_counts=True)[1]
  assert np.all(sizes[:-1] >= 512) and np.all(sizes <= 1536) and sizes.sum() == 8192
  assert 0.1 < bench.visited_fraction(segment_ids, 64, 64) < 0.2  # ~(m + 1) / (n m + 1)

  # The packed case's kernels still lower for the GPU from this host.
  q = jax.ShapeDtypeStruct((2, 8192, 1, 64), jnp.bfloat16)
  fn = (
      lambda q, k, v: flash_attention(
          q, k, v, segment_ids=jnp.asarray(segment_ids), interpret=False
      )
      .astype(jnp.float32)
      .sum()
  )
  text = (
      jax.jit(jax.grad(fn, argnums=(0, 1, 2)))
      .trace(q, q, q)
      .lower(lowering_platforms=('cuda',))
      .as_text()
  )
  assert text.count('xla.gpu.triton') == 3


HOPPER, A100, AMD = (
    devices.Device('cuda', hopper=True),
    devices.Device('cuda'),
    devices.Device('rocm'),
)


@pytest.mark.parametrize(
    'dtype,length,dim,blocks,device,expected',
    [
        (jnp.bfloat16, 4096, 128, None, HOPPER, 'mosaic_gpu'),  # H100/H200
        (jnp.float16, 8192, 64, None, HOPPER, 'mosaic_gpu'),
        (jnp.bfloat16, 2048, 128, None, HOPPER, 'gpu'),  # Triton wins at 2k
        (jnp.bfloat16, 4160, 128, None, HOPPER, 'gpu'),  # no multiple of 128
        (jnp.float32, 4096, 128, None, HOPPER, 'gpu'),  # the Hopper kernels are 16-bit
        (jnp.bfloat16, 4096, 256, None, HOPPER, 'gpu'),
        (jnp.bfloat16, 4096, 128, BlockSizes(), HOPPER, 'gpu'),  # Triton blocks named
        (jnp.bfloat16, 4096, 128, None, A100, 'gpu'),  # A100
        (jnp.bfloat16, 4096, 128, None, AMD, 'gpu'),  # LUMI's MI250X
        (jnp.bfloat16, 4096, 128, None, devices.Device('tpu'), 'tpu'),
        (jnp.bfloat16, 4096, 128, None, devices.Device('cpu'), 'gpu'),  # the interpreter
    ],
)
def test_default_backend_takes_the_hopper_kernels_only_where_they_fit_and_win(
    dtype, length, dim, blocks, device, expected
):
  assert default_backend(dtype, length, dim, blocks, device) == expected


def test_length_multiples_follow_the_default_blocks():
  assert length_multiple(128) == 128  # Triton forward blocks of 128
  assert length_multiple(64) == 64
  assert length_multiple(64, 'mosaic_gpu') == 128
  assert length_multiple(64, 'tpu') == 128


def test_only_hopper_gpus_take_the_hopper_tuned_triton_blocks():
  assert gpu_block_sizes(128, HOPPER) == GPU_BLOCK_SIZES[128]
  assert gpu_block_sizes(128, A100) == BlockSizes()  # 164 KB of shared memory
  assert gpu_block_sizes(128, AMD) == BlockSizes()
  assert gpu_block_sizes(128) == GPU_BLOCK_SIZES[128]  # CPU: tests
