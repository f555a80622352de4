"""The mesh/memory planner: sharding arithmetic against JAX's own shardings, the memory
estimate against XLA's memory analysis of the real compiled train step, the fit warning,
and the command line."""

import contextlib
import io
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from configs import base, llama_1b, tiny
from euro_lm import devices, plan
from euro_lm.bench.synthetic import compile_train_step, synthetic_batch
from euro_lm.errors import ConfigError
from euro_lm.model import Decoder, fp8, lora, param_count, train_flops_per_token
from euro_lm.model.attention import head_dim
from euro_lm.sharding import MeshError, logical_rules, make_mesh
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import abstract_train_state, init_boxed
from euro_lm.train.step import token_losses

PROJECTIONS = tuple(lora.TARGETS)  # what model.fp8 runs in fp8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
  """A 4-layer model small enough to compile the train step in seconds on 2 cores."""
  c = tiny.get_config()
  c.model.num_layers = 4
  c.model.embed_dim = 256
  c.model.mlp_dim = 704
  c.model.vocab_size = 2048
  c.train.global_batch_size = 16
  c.train.seq_len = 256
  for path, value in overrides.items():
    section, field = path.split('.')
    c[section][field] = value
  return c


MESHES = {
    'data8': {'mesh.data': 8},
    'fsdp8': {'mesh.data': 1, 'mesh.fsdp': 8},
    'tensor2': {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2},
}


# ------------------------------------------------------------------ sharding arithmetic


def test_per_device_elements_divides_by_mapped_axes():
  rules = logical_rules(base.get_config().mesh)
  degrees = {'data': 2, 'fsdp': 4, 'tensor': 2}
  # embed -> fsdp: /4; heads -> tensor: /2; head_dim unsharded.
  assert (
      plan.per_device_elements((256, 8, 64), ('embed', 'heads', 'head_dim'), rules, degrees)
      == 64 * 4 * 64
  )
  # batch -> (data, fsdp): /8; embed would be fsdp too, but fsdp is taken: unsharded.
  assert (
      plan.per_device_elements((16, 128, 256), ('batch', 'length', 'embed'), rules, degrees)
      == 2 * 128 * 256
  )
  # Not divisible: rounded up, as a padded shard.
  assert plan.per_device_elements((10,), ('embed',), rules, degrees) == 3
  assert plan.per_device_elements((7, 5), (None, None), rules, degrees) == 35


def test_fsdp8_divides_every_param_by_8_and_tensor2_heads_and_mlp():
  c = small_config(**MESHES['data8'])
  leaves = plan.state_leaves(c)
  replicated = plan.estimate_memory(c, 8, leaves=leaves)
  assert replicated.params == 4 * param_count(c.model)  # float32, nothing sharded
  fsdp = plan.estimate_memory(small_config(**MESHES['fsdp8']), 8, leaves=leaves)
  assert fsdp.params * 8 == replicated.params  # every param has an embed dim; 256 / 8
  assert fsdp.gradients == fsdp.params
  m = c.model
  hd, layers = head_dim(m), m.num_layers
  tensor = plan.estimate_memory(
      small_config(**{'mesh.data': 4, 'mesh.tensor': 2}), 8, leaves=leaves
  )
  sharded = m.vocab_size * m.embed_dim + layers * (  # embedding: vocab -> tensor
      m.embed_dim * hd * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * m.embed_dim * m.mlp_dim
  )
  unsharded = layers * 2 * m.embed_dim + m.embed_dim  # the norms' scales
  assert tensor.params == 4 * (sharded // 2 + unsharded)


@pytest.mark.parametrize('mesh', sorted(MESHES))
def test_state_bytes_match_jax_shardings(mesh):
  """Every state leaf's per-device bytes equal those of JAX's own sharding of it."""
  c = small_config(**MESHES[mesh])
  jax_mesh, rules = make_mesh(c.mesh), logical_rules(c.mesh)
  tx, _ = make_optimizer(c.optimizer, c.train.steps)
  abstract, _ = abstract_train_state(Decoder(c.model), tx, c.train.seq_len, jax_mesh, rules)
  expected = sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(abstract)
  )
  estimate = plan.estimate_memory(c, 8)
  assert estimate.state == expected
  # AdamW keeps m and v (float32, sharded like the params) plus int32 counters.
  assert estimate.optimizer == 2 * estimate.params + 2 * 4
  assert estimate.other_state == 3 * 4  # step, skipped_in_a_row, skipped_total


def test_grad_accumulation_adds_a_params_sized_buffer_and_shrinks_activations():
  one = plan.estimate_memory(small_config(), 8)
  four = plan.estimate_memory(small_config(**{'train.grad_accum_steps': 2}), 8)
  assert one.grad_accumulation == 0 and four.grad_accumulation == four.params
  assert four.activations < one.activations and four.micro_batch_per_device == 1


def test_remat_and_attention_impl_order_the_activations():
  c = llama_1b.get_config()
  leaves = plan.state_leaves(c)
  act = {
      policy: plan.estimate_memory(small_config(**{'model.remat_policy': policy}), 8).activations
      for policy in ('none', 'dots', 'dots_no_batch', 'save_attention_out', 'full')
      + ('dots_and_attention',)
  }
  # dots and dots_no_batch differ only in the attention's batched matmuls, which no attention
  # impl keeps for its backward.
  assert act['none'] > act['dots_and_attention'] > act['dots'] == act['dots_no_batch']
  assert act['dots_no_batch'] > act['save_attention_out'] > act['full']
  flash = plan.estimate_memory(
      plan.with_overrides(c, {'model.attention_impl': 'pallas'}), 8, leaves=leaves
  )
  xla = plan.estimate_memory(c, 8, leaves=leaves)
  # Both keep a log-sum-exp, not the probabilities; the xla backward recomputes float32
  # scores per query chunk: 64 seqs x 32 heads x 512 queries (1 of 8 chunks) x 4096 keys.
  assert xla.activations == flash.activations
  assert xla.working - flash.working >= 3 * 64 * 32 * 512 * 4096 * 4


def test_the_attention_planned_is_what_resolve_runs():
  """Only the xla attention adds its query chunk's scores to the working set, and which
  attention runs on the planned device is model.attention.resolve's answer."""
  h100 = devices.accelerator_device('h100')
  leaves = plan.state_leaves(small_config())

  def working(impl, dtype, device):
    c = small_config(**{'model.attention_impl': impl, 'model.compute_dtype': dtype})
    return plan.estimate_memory(c, 8, leaves=leaves, device=device).working

  for dtype in ('bfloat16', 'float32'):
    xla, pallas = working('xla', dtype, h100), working('pallas', dtype, h100)
    assert xla > pallas
    # On an H100 'auto' runs blockwise kernels: cuDNN in 16 bits, Triton in float32.
    assert working('auto', dtype, h100) == pallas
    # Where the device is not known, 'auto' resolves as on a CPU: xla.
    assert working('auto', dtype, None) == xla
  # The device also goes to config.validate: cuDNN does not run on a TPU.
  with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
    plan.estimate_memory(
        small_config(**{'model.attention_impl': 'cudnn', 'model.compute_dtype': 'bfloat16'}),
        8,
        device=devices.accelerator_device('tpu_v5'),
    )
  # The report names what runs.
  c = small_config(**{'model.attention_impl': 'auto', 'model.compute_dtype': 'bfloat16'})
  assert 'attention auto (runs cudnn on H100)' in plan.format_plan(c, 8, accelerator_name='h100')
  assert 'attention auto (runs xla: no accelerator named)' in plan.format_plan(c, 8)


# ------------------------------------------------------------------ fp8


RESIDUAL_ITEMSIZE = {'f32': 4, 'i32': 4, 'bf16': 2, 'f8_e4m3fn': 1, 'f8_e5m2': 1, 'bool': 1}


def saved_bytes(config, fp8_on):
  """Bytes of the residuals JAX's autodiff keeps for the backward of the loss (one device),
  as `jax.ad_checkpoint.print_saved_residuals` lists them ('bf16[4,256,64] output of ...')."""
  model = Decoder(config.model)
  tx, _ = make_optimizer(config.optimizer, config.train.steps)
  state = jax.eval_shape(lambda r: nn.unbox(init_boxed(model, tx, 8, r)), jax.random.key(0))
  params, fp8_state = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), (state.params, state.fp8))
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(config).items()}

  def loss(params, fp8_state):
    return token_losses(model, params, batch, fp8_state if fp8_on else None)[0].sum()

  listing = io.StringIO()
  with contextlib.redirect_stdout(listing):
    jax.ad_checkpoint.print_saved_residuals(loss, params, fp8_state)
  total = 0
  for line in listing.getvalue().splitlines():
    dtype, dims = re.match(r'(\w+)\[([\d,]*)\]', line).groups()
    total += math.prod(int(d) for d in dims.split(',') if d) * RESIDUAL_ITEMSIZE[dtype]
  return total


def test_capped_logits_keep_two_more_logit_arrays_only_without_the_fused_loss():
  """model.final_logit_softcap (Gemma 2): autodiff through the plain loss's tanh keeps the
  uncapped logits and the tanh, `[B, L, V]` float32 each (BENCHMARKS.md measured 0.96 GiB
  more at 2 x 0.49); the fused loss keeps nothing more."""
  logits = lambda **o: plan.estimate_memory(small_config(**o), 8).logits  # noqa: E731
  per_device = 16 * 256 * 2048 * 4 // 8  # [B, L, V] float32 over 8 data devices
  capped = {'model.final_logit_softcap': 30.0}
  assert logits(**capped) - logits() == 2 * per_device
  fused = {'model.loss_chunk_length': 64}
  assert logits(**capped, **fused) == logits(**fused)


def test_capped_scores_keep_one_more_score_chunk_in_the_xla_backward():
  """model.attn_logit_softcap: the xla attention's backward keeps the capped scores of its
  largest query chunk beside the probabilities (one `[B, H, L / chunks, L]` float32 more in
  the plan); XLA's own count of the attention gradient's temporaries grows by at least
  that."""
  from euro_lm.model.attention import _xla_attention, xla_query_chunks

  working = lambda **o: plan.estimate_memory(small_config(**o), 8).working  # noqa: E731
  capped = {'model.attn_logit_softcap': 50.0}
  B, L, H, d = 16 // 8, 256, 4, 64  # small_config's per-device batch, heads and head_dim
  chunk = B * H * (L // xla_query_chunks(L, causal=True)) * L * 4
  assert working(**capped) - working() == chunk

  def temporaries(cap):
    q = jnp.ones((B, L, H, d), jnp.float32)
    loss = lambda q, k, v: _xla_attention(  # noqa: E731
        q, k, v, jnp.ones((B, L), jnp.int32), True, (d**-0.5, cap), 0
    ).sum()
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return step.memory_analysis().temp_size_in_bytes

  assert temporaries(50.0) - temporaries(0.0) >= chunk


@pytest.mark.parametrize('policy', ['none', 'full'])
def test_fp8_adds_its_quantized_copies_and_state(policy):
  """model.fp8 keeps, per layer, each projection's input and weight in float8_e4m3fn (one
  byte an element): saved under no remat, one layer's recomputed under remat. Against the
  byte count from shapes and the residuals JAX's autodiff keeps."""
  overrides = {'model.compute_dtype': 'bfloat16', 'model.remat_policy': policy, 'mesh.data': 1}
  off, on = small_config(**overrides), small_config(**overrides, **{'model.fp8': True})
  est_off, est_on = plan.estimate_memory(off, 1), plan.estimate_memory(on, 1)
  m, t = on.model, on.train
  b, L, D, F, hd = t.global_batch_size, t.seq_len, m.embed_dim, m.mlp_dim, head_dim(m)
  H, K = m.num_heads, m.num_kv_heads
  inputs = b * L * (3 * D + H * hd + 2 * D + F)  # q, k, v, o, gate, up, down
  weights = D * (H + 2 * K) * hd + H * hd * D + 3 * D * F
  state = len(PROJECTIONS) * m.num_layers * 3 * (fp8.AMAX_HISTORY + 1) * 4  # histories, scales
  assert est_on.fp8_state == state and est_off.fp8_state == 0
  assert est_on.state - est_off.state == state
  saved, transient = m.num_layers * (inputs + weights), 0
  if policy != 'none':
    saved, transient = 0, inputs + weights
  # The backward also keeps the new scales and histories.
  assert est_on.activations - est_off.activations == saved + state
  assert est_on.working - est_off.working == transient
  assert 'compute bfloat16 (projections fp8)' in plan.format_plan(on, 1)
  assert est_on.activations - est_off.activations == saved_bytes(on, True) - saved_bytes(off, False)


# `estimate_memory(small_config(...), 8).total` at 63d5b88, before the planner knew model.fp8.
BEFORE_FP8 = {
    ('none', 'float32'): 109535252,
    ('none', 'bfloat16'): 97704980,
    ('full', 'float32'): 84463636,
    ('full', 'bfloat16'): 80432148,
    ('dots_no_batch', 'float32'): 104386580,
    ('dots_no_batch', 'bfloat16'): 90393620,
}


@pytest.mark.parametrize('policy, dtype', sorted(BEFORE_FP8))
def test_fp8_off_plans_as_before(policy, dtype):
  c = small_config(**{'model.remat_policy': policy, 'model.compute_dtype': dtype})
  assert not c.model.fp8
  assert plan.estimate_memory(c, 8).total == BEFORE_FP8[policy, dtype]


def test_the_fp8_state_is_replicated_in_the_state_bytes():
  c = small_config(**{'model.compute_dtype': 'bfloat16', 'model.fp8': True}, **MESHES['fsdp8'])
  jax_mesh, rules = make_mesh(c.mesh), logical_rules(c.mesh)
  tx, _ = make_optimizer(c.optimizer, c.train.steps)
  abstract, _ = abstract_train_state(Decoder(c.model), tx, c.train.seq_len, jax_mesh, rules)
  replicated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.fp8))
  est = plan.estimate_memory(c, 8)
  assert est.fp8_state == replicated > 0
  assert est.state == sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(abstract)
  )
  assert ('fp8 scales and amax histories', replicated) in est.rows()


# ------------------------------------------------------------------ against XLA


def xla_memory(config):
  compiled = compile_train_step(config)[0]
  return compiled.memory_analysis()


@pytest.mark.parametrize(
    'overrides',
    [
        {'model.remat_policy': 'none'},
        pytest.param({'model.remat_policy': 'full'}, marks=pytest.mark.slow),  # as full-fsdp8
        {
            'model.remat_policy': 'none',
            'train.seq_len': 128,
            'model.num_layers': 6,
            **MESHES['tensor2'],
        },
        {'model.remat_policy': 'full', **MESHES['fsdp8']},
        {'model.remat_policy': 'dots_no_batch', 'train.grad_accum_steps': 2},
        {'model.remat_policy': 'none', 'model.mlp_activation': 'xielu'},  # no gate (Apertus)
    ],
    ids=['none', 'full', 'none-tensor2-L128', 'full-fsdp8', 'dots_no_batch-accum2', 'none-xielu'],
)
def test_estimate_against_xla_memory_analysis(overrides):
  c = small_config(**overrides)
  m = xla_memory(c)
  est = plan.estimate_memory(c, 8)
  ways = est.degrees['data'] * est.degrees['fsdp']
  batch_bytes = 4 * 4 * c.train.global_batch_size * c.train.seq_len // ways  # 4 int32 [B, L]
  # The donated state is the step's argument: exact, up to the batch.
  assert m.argument_size_in_bytes - batch_bytes == pytest.approx(est.state, rel=0.01)
  # Everything else (grads, activations, logits, working set) is XLA's temporaries.
  temp = est.gradients + est.grad_accumulation + est.activations + est.logits + est.working
  assert 0.5 < temp / m.temp_size_in_bytes < 2, (temp, m.temp_size_in_bytes)
  xla_total = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )
  assert 0.5 < est.total / xla_total < 2, (est.total, xla_total)


# ------------------------------------------------------------------ report and errors


def test_warns_with_what_to_change_when_it_does_not_fit():
  text = plan.format_plan(llama_1b.get_config(), 1, device_memory_gib=80)
  assert 'does NOT fit' in text
  warnings = [line for line in text.splitlines() if line.startswith('WARNING:')]
  assert warnings and any('--config.' in line for line in warnings)
  assert 'estimate' in text.splitlines()[0]


def test_fitting_plan_has_no_warning_and_a_time():
  text = plan.format_plan(small_config(), 8, accelerator_name='h100', mfu=0.5, tokens=1e9)
  assert 'fits' in text and 'WARNING' not in text
  assert '8x H100' in text and '50% MFU' in text


def test_suggested_change_fits():
  c = llama_1b.get_config('gpu')
  # The H100's usable memory, and its device: without one, the preset's 'auto' attention
  # would be planned as xla, not as the kernels that run on an H100.
  budget, h100 = 72 * plan.GIB, devices.accelerator_device('h100')
  found = plan.suggestions(c, 8, 1, budget, device=h100)
  assert found
  change, total = found[0]
  assert total <= budget
  assert plan.estimate_memory(plan.with_overrides(c, change), 8, device=h100).total == total


def test_the_combination_leaves_out_what_a_run_rejects():
  """Heads of 256 (Gemma 2 2B's and 9B's) with the Hopper kernels named: neither they nor
  cuDNN take them, so xla runs and the pallas candidate is rejected, and the combination
  of the other changes is still found. With the kernel set left to `auto`, the Triton
  kernels take them and the candidate stands."""
  c = small_config(
      **{
          'model.head_dim': 256,
          'model.compute_dtype': 'bfloat16',
          'model.vocab_size': 32_000,
          'train.seq_len': 2048,
      }
  )
  h100 = devices.accelerator_device('h100')
  pallas = {'model.attention_impl': 'pallas'}
  assert plan.estimate_with_overrides(c, pallas, 1, device=h100) is not None
  c.model.pallas_backend = 'mosaic_gpu'
  assert plan.estimate_with_overrides(c, pallas, 1, device=h100) is None
  combination = {
      'model.remat_policy': 'full',
      'model.loss_chunk_length': plan.LOSS_CHUNK_LENGTH,
      'train.grad_accum_steps': 16,
  }
  total = plan.estimate_with_overrides(c, combination, 1, device=h100).total
  singles = [
      plan.estimate_with_overrides(c, {k: v}, 1, device=h100).total for k, v in combination.items()
  ]
  assert total < min(singles)  # so only the combination fits this budget
  found = plan.suggestions(c, 1, 1, total, device=h100)
  assert found and found[0][1] <= total
  assert 'model.attention_impl' not in found[0][0]


def test_estimate_with_overrides_skips_what_a_run_rejects():
  c = small_config()
  change = {'model.remat_policy': 'full', **MESHES['fsdp8']}
  est = plan.estimate_with_overrides(c, change, 8)
  assert est == plan.estimate_memory(plan.with_overrides(c, change), 8)
  assert c.model.remat_policy != 'full'  # the config itself is left as it was
  assert plan.estimate_with_overrides(c, {'mesh.data': 3}, 8) is None  # 3 does not divide 8


def test_accelerators_come_from_the_devices_table():
  for known in devices.ACCELERATORS:
    assert plan.peak_flops(known.name) == known.peak_flops_16bit
    assert plan.accelerator(known.name)[2] == known.memory_gib > 0
  assert plan.accelerator('h100_pcie')[0] == 'H100 PCIe'
  with pytest.raises(ConfigError, match='known: H100 PCIe, .*TPU v4'):
    plan.accelerator('h1000')


def test_training_seconds():
  m = llama_1b.get_config().model
  seconds = plan.training_seconds(m, 4096, 1e12, 64, 1e15, mfu=0.5)
  assert seconds == pytest.approx(train_flops_per_token(m, 4096) * 1e12 / (64 * 1e15 * 0.5))
  with pytest.raises(ConfigError, match='mfu'):
    plan.training_seconds(m, 4096, 1e12, 64, 1e15, mfu=0)


def test_summary_row():
  c = small_config()
  row = plan.summary(c, 8, accelerator_name='a100', mfu=0.5, tokens=2e9)
  assert row['params'] == param_count(c.model) and row['fits'] and row['accelerator'] == '8x A100'
  assert row['days'] == pytest.approx(
      plan.training_seconds(c.model, c.train.seq_len, 2e9, 8, plan.peak_flops('A100'), 0.5) / 86400
  )
  a100 = devices.accelerator_device('a100')
  assert row['memory_gib_per_device'] == plan.estimate_memory(c, 8, device=a100).total / plan.GIB


def test_bad_mesh_names_the_field():
  with pytest.raises(MeshError, match='mesh.fsdp=0'):
    plan.estimate_memory(small_config(**{'mesh.fsdp': 0}), 8)
  with pytest.raises(MeshError, match=r'--config.mesh.dcn_fsdp=2'):
    plan.estimate_memory(small_config(), 8, num_nodes=2)
  with pytest.raises(ConfigError, match='train.global_batch_size'):
    plan.estimate_memory(small_config(**{'train.global_batch_size': 4}), 8)


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'euro_lm.plan', *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )


def test_cli():
  result = run_cli(
      '--config=configs/llama_7b.py:gpu',
      '--devices=16',
      '--nodes=4',
      '--accelerator=h100',
      '--config.mesh.dcn_fsdp=4',
  )
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert 'mesh: 16 devices on 4 nodes: data=1 fsdp=16 tensor=1' in out
  assert '64 sequences per device per micro-batch' in out
  for row in (
      'params (float32)',
      'gradients (float32)',
      'optimizer state',
      'activations saved for backward',
      'total',
  ):
    assert row in out
  assert 'does NOT fit' in out and 'WARNING: to fit, change --config.train.grad_accum_steps=' in out
  assert 'on 16x H100' in out

  bad = run_cli('--config=configs/tiny.py', '--devices=8', '--config.mesh.data=3')
  assert bad.returncode != 0 and 'error: mesh: data*fsdp*tensor = 3*1*1' in bad.stderr
  unknown = run_cli('--config=configs/tiny.py', '--accelerator=b300')
  assert unknown.returncode != 0 and "unknown accelerator 'b300'" in unknown.stderr
  assert 'H100' in unknown.stderr and 'MI250X' in unknown.stderr


# ------------------------------------------------------------------ notebook helpers


PARTS = ('params_gib', 'gradients_gib', 'optimizer_gib', 'activations_gib', 'total_gib')


def test_presets_table_rows_are_summary_and_estimate_values():
  configs = {
      'data8': small_config(),
      'fsdp8': small_config(**{'mesh.data': 1, 'mesh.fsdp': 8, 'train.grad_accum_steps': 2}),
  }
  rows = plan.presets_table(configs, 8, accelerator_name='a100', mfu=0.5, tokens=2e9)
  assert [r['preset'] for r in rows] == ['data8', 'fsdp8']
  for row, c in zip(rows, configs.values()):
    s = plan.summary(c, 8, accelerator_name='a100', mfu=0.5, tokens=2e9)
    assert row['params'] == s['params']
    assert row['train_flops_per_token'] == s['train_flops_per_token']
    assert row['total_gib'] == s['memory_gib_per_device']
    assert (row['fits'], row['days'], row['accelerator'], row['tokens']) == (
        s['fits'],
        s['days'],
        s['accelerator'],
        2e9,
    )
    est = plan.estimate_memory(c, 8, device=devices.accelerator_device('a100'))
    assert row['params_gib'] == est.params / plan.GIB
    assert row['gradients_gib'] == (est.gradients + est.grad_accumulation) / plan.GIB
    assert row['optimizer_gib'] == (est.optimizer + est.other_state) / plan.GIB
    assert row['activations_gib'] == (est.activations + est.logits + est.working) / plan.GIB
    assert sum(row[k] for k in PARTS[:4]) == pytest.approx(row['total_gib'])
    assert row['micro_batch_per_device'] == est.micro_batch_per_device
    assert row['usable_gib'] == 80 * 0.9 and row['to_fit'] == '' and row['error'] is None
  assert rows[0]['mesh'] == 'data=8 fsdp=1 tensor=1'
  assert rows[1]['mesh'] == 'data=1 fsdp=8 tensor=1'
  assert rows[1]['gradients_gib'] == 2 * rows[1]['params_gib']  # the accumulation buffer
  # Without a token budget, each config's own run.
  (own,) = plan.presets_table({'data8': configs['data8']}, 8)
  t = configs['data8'].train
  assert own['tokens'] == t.steps * t.global_batch_size * t.seq_len


def test_presets_table_overrides_misfits_and_errors():
  big = small_config(**{'train.global_batch_size': 2048, 'train.seq_len': 1024})
  configs = {'big': big, 'small': small_config()}
  rows = plan.presets_table(
      configs, 8, accelerator_name='tpu_v5_lite', overrides={'mesh.data': 1, 'mesh.fsdp': 8}
  )
  fsdp_big = small_config(
      **{'train.global_batch_size': 2048, 'train.seq_len': 1024, 'mesh.data': 1, 'mesh.fsdp': 8}
  )
  tpu = devices.accelerator_device('tpu_v5_lite')
  est = plan.estimate_memory(fsdp_big, 8, device=tpu)
  budget = 16 * plan.GIB * plan.USABLE_FRACTION
  assert est.total > budget and rows[0]['total_gib'] == est.total / plan.GIB
  assert rows[0]['fits'] is False and rows[0]['mesh'] == 'data=1 fsdp=8 tensor=1'
  found = plan.suggestions(fsdp_big, 8, 1, budget, device=tpu)
  assert rows[0]['to_fit'] == plan.describe_change(found[0][0]) != ''
  assert rows[1]['fits'] is True
  bad = plan.presets_table(configs, 8, overrides={'mesh.data': 3})
  for row in bad:
    assert 'mesh' in row['error'] and row['mesh'] is None and row['fits'] is None
    assert all(row[k] is None for k in PARTS) and row['params'] > 0 and row['days'] > 0
  text = plan.format_presets_table(rows + bad[:1]).splitlines()
  assert len(text) == 3 + 3 + 2  # title, header, rule; 3 rows; a fix and an error
  assert text[3].split()[0] == 'big' and ' NO ' in text[3]
  assert text[4].split()[0] == 'small' and ' yes ' in text[4]
  assert text[-2] == f'big: to fit, {rows[0]["to_fit"]}'
  assert text[-1] == f'big: {bad[0]["error"]}'


def test_scaling_points_are_fsdp_estimates():
  c = small_config()
  points = plan.scaling_points(
      {'small': c}, [1, 8, 16, 32], devices_per_node=8, accelerator_name='h100', mfu=0.5, tokens=1e9
  )
  assert [(p['devices'], p['nodes']) for p in points] == [(1, 1), (8, 1), (16, 2), (32, 4)]
  for p in points[:3]:
    fsdp = small_config(**{'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.dcn_fsdp': p['nodes']})
    est = plan.estimate_memory(
        fsdp, p['devices'], p['nodes'], device=devices.accelerator_device('h100')
    )
    assert p['total_gib'] == est.total / plan.GIB
    assert p['fits'] is True
  # 32 devices do not divide the global batch of 16: a run would reject it.
  assert points[3]['total_gib'] is None and points[3]['fits'] is None
  for p in points:
    assert (
        p['days']
        == plan.training_seconds(
            c.model, c.train.seq_len, 1e9, p['devices'], plan.peak_flops('h100'), 0.5
        )
        / 86400
    )
  assert points[0]['usable_gib'] == 80 * 0.9


def test_plot_scaling_draws_the_points():
  matplotlib = pytest.importorskip('matplotlib')
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  big = small_config(**{'train.global_batch_size': 2048, 'train.seq_len': 1024})
  points = plan.scaling_points(
      {'small': small_config(), 'big': big}, [1, 8, 32], accelerator_name='tpu_v5_lite'
  )
  axes = plan.plot_scaling(points)
  try:
    small = [p for p in points if p['preset'] == 'small' and p['total_gib'] is not None]
    big_points = [p for p in points if p['preset'] == 'big']
    over = [p for p in big_points if not p['fits']]
    assert len(small) == 2 and len(over) >= 1  # 32 devices: the small batch does not divide
    for ax, key in zip(axes, ('days', 'total_gib')):
      lines = [line for line in ax.get_lines() if line.get_label() in ('small', 'big')]
      assert [line.get_label() for line in lines] == ['small', 'big']
      for line, ps in zip(lines, (small, big_points)):
        assert list(line.get_xdata()) == [p['devices'] for p in ps]
        assert list(line.get_ydata()) == [p[key] for p in ps]
      crosses = [line for line in ax.get_lines() if line.get_marker() == 'x']
      assert [list(line.get_ydata()) for line in crosses] == [[p[key] for p in over]]
      assert ax.get_xscale() == 'log' and ax.get_yscale() == 'log'
    usable = [line for line in axes[1].get_lines() if line.get_label().startswith('usable')]
    assert list(usable[0].get_ydata()) == [16 * 0.9] * 2
  finally:
    plt.close('all')


def test_plot_helpers_import_matplotlib_lazily():
  code = (
      'import sys; import euro_lm.plan, euro_lm.data.prepare.fertility; '
      'assert "matplotlib" not in sys.modules, "matplotlib imported"'
  )
  result = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
      check=False,
  )
  assert result.returncode == 0, result.stderr
