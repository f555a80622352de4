"""`euro_lm.bench.profile`: the traced train step by kind of work and part of the step."""

import collections

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from euro_lm.bench import profile
from euro_lm.plan import hlo

STEPS = 2


@pytest.fixture(scope='module')
def traced(tmp_path_factory):
  config = tiny.get_config()  # on the 8 devices of tests/conftest.py
  config.model.remat_policy = 'full'  # so that the forward is recomputed in the backward
  directory = str(tmp_path_factory.mktemp('trace'))
  hlo_text = profile.trace_steps(config, STEPS, directory).as_text()
  return config, profile.read_trace(directory), hlo_text


def _ops_in_steps(trace, hlo_text):
  classifier = profile.Classifier(hlo_text)
  ops = profile.traced_ops(trace, profile.module_name(hlo_text), classifier)
  return classifier, ops


def test_each_op_is_counted_once_per_run(traced):
  """An op in the layer scan runs once per layer, the rest once per step (the loops' trip
  counts, read from the HLO): what XLA ran is what the trace reading counts, for device 0
  of the 8, with the while loops themselves left out."""
  _, trace, hlo_text = traced
  classifier, ops = _ops_in_steps(trace, hlo_text)
  runs = collections.Counter(op.name for op in ops)
  assert not any(classifier.is_container(name) for name in runs)
  per_step = hlo.runs_per_step(hlo_text)
  computation_of = {
      name: computation for computation, names in classifier.computations.items() for name in names
  }
  assert (
      max(per_step[computation_of[name]][0] for name in runs) == tiny.get_config().model.num_layers
  )
  for name, count in runs.items():
    assert count == STEPS * per_step[computation_of[name]][0], name
  traced_kinds = {classifier.kind(name) for name in runs}
  assert {profile.MATMUL, profile.FUSION} <= traced_kinds


def test_breakdown_by_kind_and_part(traced):
  _, trace, hlo_text = traced
  result = profile.breakdown(trace, hlo_text, profile.module_name(hlo_text))
  assert result['steps'] == STEPS
  for key in ('kinds', 'parts', 'ops'):
    assert sum(result[key].values()) == pytest.approx(result['op_ms'])
  assert 0 < result['busy_ms'] <= result['step_ms']
  assert result['busy_ms'] <= result['op_ms'] * (1 + 1e-9)
  assert result['attributed'] > 0.95
  assert result['kinds'][profile.MATMUL] > 0
  for module in ('MLP', 'attention projections', 'attention core', 'norms'):
    for direction in ('forward', 'recompute', 'backward'):
      assert result['parts'].get(f'{module}, {direction}', 0) > 0, (module, direction)
  for part in ('logits and loss, forward', 'logits and loss, backward', 'optimizer'):
    assert result['parts'].get(part, 0) > 0, part
  text = profile.format_tables(result, top=5)
  assert text.count('\n| `') == 5


def test_parts_from_jax_name_stacks():
  """The name stacks JAX itself writes under grad, remat and named scopes."""

  def step(w, x):
    def loss(w):
      with jax.named_scope('mlp'):
        layer = jax.checkpoint(lambda w, x: jnp.tanh(x @ w), policy=None)
        y = layer(w, x)
      with jax.named_scope('loss'):
        return jnp.sum(jnp.square(y))

    g = jax.grad(loss)(w)
    with jax.named_scope('optimizer'):
      return w - 0.1 * jnp.sign(g)

  w, x = jnp.ones((32, 32)), jnp.ones((8, 32))
  hlo_text = jax.jit(step).lower(w, x).compile().as_text()
  computations, _ = hlo.computations(hlo_text)
  parts = {profile.part(i.op_name) for c in computations.values() for i in c if i.op_name}
  expected = {
      'MLP, forward',
      'MLP, recompute',
      'MLP, backward',
      'logits and loss, forward',
      'optimizer',
  }
  assert expected <= parts, parts  # the loss's backward is fused into the MLP's here


@pytest.mark.parametrize(
    'kernel, kind',
    [
        (
            'sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1'
            '_execute_segment_k_off_kernel__5x_cublas',
            profile.MATMUL,
        ),
        ('nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT', profile.MATMUL),
        (
            'ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)',
            profile.COLLECTIVE,
        ),
        (
            'cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1'
            '_kernel0_0',
            profile.ATTENTION,
        ),
        ('loop_add_fusion', profile.OTHER),
    ],
)
def test_kind_of_an_unattributed_gpu_kernel(kernel, kind):
  assert profile.kernel_kind(kernel) == kind
