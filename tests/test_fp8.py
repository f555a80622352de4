"""FP8 projections (`model.fp8`): off changes nothing, on lowers to fp8 dots, trains with
its scales overwritten (not AdamW-updated), checkpoints and resumes exactly, and exports
without its state; validate refuses it where it cannot be fast."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from orbax import checkpoint as ocp

from configs import tiny
from euro_lm import hf
from euro_lm.checkpoint import load_params
from euro_lm.config import validate
from euro_lm.data import dataset
from euro_lm.devices import Device
from euro_lm.errors import ConfigError
from euro_lm.model import Decoder, fp8
from euro_lm.plan.memory import state_leaves
from euro_lm.sharding import global_batch, logical_rules, make_mesh
from euro_lm.train.loop import train
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import abstract_train_state, create_train_state
from euro_lm.train.step import make_train_step, token_losses
from tests.run_records import step_records

PROJECTIONS = ('wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down')


def small_config(fp8_on=True, grad_accum_steps=1):
  c = tiny.get_config()
  c.model.vocab_size, c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 128, 2, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 8
  c.model.compute_dtype, c.model.fp8 = 'bfloat16', fp8_on
  c.train.global_batch_size, c.train.seq_len = 4, 16
  c.train.grad_accum_steps = grad_accum_steps
  c.mesh.data = 1
  c.optimizer.warmup_steps, c.optimizer.weight_decay = 0, 0.1
  return c


def fixed_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, l = config.train.global_batch_size, config.train.seq_len
  tokens = rng.integers(0, config.model.vocab_size, (b, l + 1), dtype=np.int32)
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': np.ones((b, l), np.int32),
      'positions': np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)),
  }


class Run:
  """A state and its jitted step on one device."""

  def __init__(self, config, devices=None):
    self.config = config
    self.model = Decoder(config.model)
    self.tx, schedule = make_optimizer(config.optimizer, total_steps=10)
    self.mesh = make_mesh(config.mesh, devices or jax.devices()[:1])
    self.rules = logical_rules(config.mesh)
    self.state, self.shardings = create_train_state(
        self.model, self.tx, config.train.seq_len, jax.random.key(0), self.mesh, self.rules
    )
    self.step = make_train_step(
        self.model, self.tx, schedule, config.train, 0.0, self.mesh, self.shardings
    )

  def batch(self, seed=0):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return global_batch(fixed_batch(self.config, seed), self.mesh, self.rules)

  def lowered_text(self, platform=None):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      traced = self.step.trace(self.state, self.batch())
      lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
      return lowered.as_text()

  def train(self, steps, seed=0):
    losses = []
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for _ in range(steps):
        self.state, metrics = self.step(self.state, self.batch(seed))
        losses.append(float(metrics['loss']))
    return losses


def dot_operand_types(hlo_text):
  """The operand element types of every dot_general in a lowered module."""
  types = []
  for line in hlo_text.splitlines():
    if 'stablehlo.dot_general' in line:
      operands = line.rsplit(': (', 1)[1].split(') ->')[0]
      types.append(tuple(t.rsplit('x', 1)[1].rstrip('>') for t in operands.split(', ')))
  return types


STEPS, MICRO = 4, 2  # micro-batches per step: the fp8 state passes through each


@pytest.fixture(scope='module')
def fp8_run():
  """Steps of one fixed batch with fp8, and the params before the last one."""
  run = Run(small_config(grad_accum_steps=MICRO))
  losses = run.train(STEPS - 1)
  before_last = jax.device_get(run.state.params)
  losses += run.train(1)
  return run, losses, before_last


def test_off_is_bit_identical_to_a_config_without_the_field():
  off = small_config(fp8_on=False, grad_accum_steps=2)
  absent = small_config(fp8_on=False, grad_accum_steps=2)
  del absent.model['fp8']  # the model as it was before the field existed
  runs = [Run(off), Run(absent)]
  assert runs[0].state.fp8 == {}
  assert not any('f8E' in t for types in dot_operand_types(runs[0].lowered_text()) for t in types)
  losses = [run.train(2) for run in runs]
  assert losses[0] == losses[1]
  jax.tree.map(np.testing.assert_array_equal, *[jax.device_get(run.state.params) for run in runs])


@pytest.mark.parametrize('platform', [None, 'cuda'])
def test_projections_lower_to_e4m3_forward_and_e5m2_gradient_dots(fp8_run, platform):
  """On this CPU, and for an NVIDIA GPU (lowered here, not compiled)."""
  run, _, _ = fp8_run
  types = dot_operand_types(run.lowered_text(platform))
  forward = [t for t in types if t == ('f8E4M3FN', 'f8E4M3FN')]
  gradient = [t for t in types if 'f8E5M2' in t]
  # Once each in the scanned layer body: 7 projections forward, 2 gradient dots each.
  assert len(forward) >= len(PROJECTIONS) and len(gradient) >= 2 * len(PROJECTIONS)
  assert all(set(t) == {'f8E5M2', 'f8E4M3FN'} for t in gradient)


@pytest.mark.slow
def test_a_2x2x2_mesh_trains_like_one_device(fp8_run):
  """Sharded weights (fsdp, tensor), the replicated fp8 state: the same losses as one
  device, up to the reduction order."""
  config = small_config(grad_accum_steps=MICRO)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config.train.global_batch_size = 8
  sharded = Run(config, devices=jax.devices())
  single = Run(small_config(grad_accum_steps=MICRO))
  single.config.train.global_batch_size = 8
  np.testing.assert_allclose(sharded.train(3), single.train(3), rtol=1e-4)
  assert jax.tree.leaves(sharded.state.fp8)[0].sharding.spec == jax.sharding.PartitionSpec()


def test_the_fp8_loss_is_close_to_bfloat16s(fp8_run):
  run, _, _ = fp8_run
  batch = fixed_batch(run.config, seed=1)  # not the batch trained on
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):

    @jax.jit
    def mean_loss(params, state):
      nll_BL, _, weights_BL = token_losses(run.model, params, batch, state)
      return jnp.sum(nll_BL * weights_BL) / jnp.sum(weights_BL)

    with_fp8 = float(mean_loss(run.state.params, run.state.fp8))
    without = float(mean_loss(run.state.params, None))
  assert with_fp8 != without
  assert abs(with_fp8 - without) <= 0.01 * without


def test_training_lowers_the_loss_and_overwrites_the_scales(fp8_run):
  run, losses, before_last = fp8_run
  assert losses[-1] < losses[0] - 0.1, losses
  state = jax.device_get(run.state.fp8)
  # The optimizer holds moments of the params only.
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(run.state)]
  assert not any(fp8.SUFFIX in p for p in opt_paths if p.startswith('.opt_state'))
  assert set(state['layers']['attention']) | set(state['layers']['mlp']) == {
      name + fp8.SUFFIX for name in PROJECTIONS
  }
  fp8_max = float(jnp.finfo(jnp.float8_e4m3fn).max)
  for module, name in (('attention', 'wq'), ('mlp', 'w_down')):
    meta = state['layers'][module][name + fp8.SUFFIX]
    history, scale = meta['kernel_amax_history'], meta['kernel_scale']  # [layers, ...]
    # One maximum per micro-batch (Flax keeps the newest first); the rest is still zero.
    assert np.all(np.count_nonzero(history, axis=1) == STEPS * MICRO)
    # The newest is the largest |W| in bfloat16 as the last step saw W, in both of its
    # micro-batches: stored, not AdamW-updated.
    w = before_last['layers'][module][name].astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(history[:, 0], np.abs(w).reshape(len(w), -1).max(axis=1))
    np.testing.assert_array_equal(history[:, 0], history[:, -1])
    # The scale the last micro-batch used came from the maxima before it (delayed scaling).
    np.testing.assert_allclose(scale[:, 0], history[:, 1:].max(axis=1) / fp8_max, rtol=1e-6)


def test_the_state_is_replicated_and_the_planner_counts_it(fp8_run):
  run, _, _ = fp8_run
  for sharding in jax.tree.leaves(run.shardings.fp8):
    assert sharding.spec == jax.sharding.PartitionSpec()
  leaves = [leaf for leaf in state_leaves(run.config) if leaf.path.startswith('.fp8')]
  assert len(leaves) == 6 * len(PROJECTIONS)
  assert all(leaf.part == 'fp8' and set(leaf.logical_axes) == {None} for leaf in leaves)
  history = sum(np.prod(leaf.shape) for leaf in leaves if 'history' in leaf.path)
  assert history == 3 * len(PROJECTIONS) * run.config.model.num_layers * fp8.AMAX_HISTORY


@pytest.mark.parametrize(
    'overrides, device, message',
    [
        ({'model.compute_dtype': 'float32'}, None, "needs model.compute_dtype=bfloat16, not 'fl"),
        ({}, Device('cuda', kind='NVIDIA A100-SXM4-80GB'), 'Hopper or newer GPU'),
        ({}, Device('tpu', kind='TPU v5 lite'), 'Hopper or newer GPU'),
        ({}, Device('rocm', kind='AMD Instinct MI300X'), 'Hopper or newer GPU'),
    ],
)
def test_validate_refuses_fp8_where_it_cannot_be_fast(overrides, device, message):
  config = small_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message) as error:
    validate(config, 1, device=device)
  assert str(error.value).startswith('model.fp8=True') and '\n' not in str(error.value)


@pytest.mark.parametrize(
    'device',
    [None, Device('cpu'), Device('cuda', hopper=True), Device('cuda', capability='10.0')],
)
def test_validate_allows_fp8_on_hopper_and_newer_and_the_cpu(device):
  validate(small_config(), 1, device=device)


RUN = {
    'model.num_layers': 2,
    'model.embed_dim': 64,
    'model.mlp_dim': 128,
    'model.head_dim': 16,
    'model.vocab_size': 512,
    'model.tie_embeddings': False,
    'model.compute_dtype': 'bfloat16',
    'model.fp8': True,
    'train.steps': 4,
    'train.global_batch_size': 8,
    'train.seq_len': 32,
    'train.log_every': 1,
    'train.eval_every': 0,
    'train.checkpoint_every': 2,
    'data.languages': 'deu_Latn,fra_Latn,ell_Grek',
}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """An fp8 run of 4 steps, and the same run resumed from its step-2 checkpoint."""
  root = tmp_path_factory.mktemp('fp8_runs')
  config = tiny.get_config()
  config.update_from_flattened_dict(RUN)
  dataset.make_data(config, str(root / 'tokenizer'))
  config.data.tokenizer_path = str(root / 'tokenizer' / 'tokenizer.model')
  straight, resumed = str(root / 'straight'), str(root / 'resumed')
  train(config, straight)
  shutil.copytree(
      os.path.join(straight, 'checkpoints', '2'), os.path.join(resumed, 'checkpoints', '2')
  )
  train(config, resumed)
  return config, straight, resumed


def test_resume_from_a_checkpoint_is_exact(trained):
  _, straight, resumed = trained
  reference, records = step_records(straight), step_records(resumed)
  assert sorted(reference) == [1, 2, 3, 4]
  for step in (3, 4):
    assert records[step] == reference[step], step


def test_checkpoints_hold_the_state_and_export_leaves_it_out(trained, tmp_path):
  config, straight, _ = trained
  model = Decoder(config.model)
  tx, _ = make_optimizer(config.optimizer, config.train.steps)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  abstract, _ = abstract_train_state(model, tx, 8, mesh, logical_rules(config.mesh))
  saved = pathlib.Path(straight, 'checkpoints', '4', 'state')
  metadata = ocp.PyTreeCheckpointHandler().metadata(saved).tree
  assert set(metadata['fp8']['layers']['mlp']) == {'w_gate_fp8', 'w_up_fp8', 'w_down_fp8'}
  assert len(jax.tree.leaves(abstract.fp8)) == 6 * len(PROJECTIONS)

  output = str(tmp_path / 'hf')
  hf.export_hf(straight, output, dtype='float32', log=lambda *a: None)
  with open(os.path.join(output, 'model.safetensors.index.json')) as f:
    names = list(json.load(f)['weight_map'])
  assert not any('fp8' in n or 'amax' in n or 'scale' in n for n in names), names
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      output, dtype=torch.float32, attn_implementation='eager', local_files_only=True
  ).eval()
  # Exported params run in float32 here and in transformers: the same logits.
  float32 = config.model.copy_and_resolve_references()
  float32.compute_dtype, float32.fp8 = 'float32', False
  params, _ = load_params(straight, abstract.params)
  tokens_BL = np.random.default_rng(0).integers(0, config.model.vocab_size, (1, 16))
  want = Decoder(float32).apply({'params': params}, jnp.asarray(tokens_BL))
  with torch.no_grad():
    got = hf_model(torch.as_tensor(tokens_BL)).logits.numpy()
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-4)


def test_resuming_with_fp8_off_drops_its_state(trained, tmp_path):
  config, straight, _ = trained
  shutil.copytree(
      os.path.join(straight, 'checkpoints', '2'), os.path.join(tmp_path, 'checkpoints', '2')
  )
  off = config.copy_and_resolve_references()
  off.model.fp8 = False
  train(off, str(tmp_path))
  assert sorted(step_records(tmp_path)) == [3, 4]
  saved = ocp.PyTreeCheckpointHandler().metadata(tmp_path / 'checkpoints' / '4' / 'state').tree
  assert not jax.tree.leaves(saved.get('fp8', {}))
