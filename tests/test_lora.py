"""LoRA: adapters that start as the base model, train alone (no optimizer moments and no
weight gradients for the frozen weights), shard like their weights, store alone and merge
into the base weights."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import tiny
from euro_lm.config import validate
from euro_lm.errors import ConfigError
from euro_lm.model import Decoder, lora, param_count, train_flops_per_token
from euro_lm.plan import estimate_memory
from euro_lm.sharding import global_batch, logical_rules, make_mesh
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import create_train_state, train_state_from_params, with_fresh_adapters
from euro_lm.train.step import _loss_sums, make_train_step


def small_config(rank=4, data=1, fsdp=1, tensor=1, grad_accum_steps=1):
  c = tiny.get_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.mlp_dim = 128, 2, 32, 64
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 8
  m.qkv_bias = True  # its params come after the q/k/v adapters in the module
  m.lora_rank, m.lora_alpha = rank, 8.0
  c.train.global_batch_size, c.train.seq_len = 8, 16
  c.train.grad_accum_steps = grad_accum_steps
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-2, 0
  c.optimizer.schedule = 'constant'
  return c


def fixed_batch(config):
  rng = np.random.default_rng(0)
  b, l = config.train.global_batch_size, config.train.seq_len
  tokens = rng.integers(0, config.model.vocab_size, (b, l + 1), dtype=np.int32)
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': np.ones((b, l), np.int32),
      'positions': np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
  }


def init(model_config, tokens):
  return jax.jit(lambda r: nn.unbox(Decoder(model_config).init(r, tokens)['params']))(
      jax.random.key(0)
  )


def logits(model_config, params, tokens):
  return jax.jit(Decoder(model_config).apply)({'params': params}, tokens)


def spec(x):
  """The mesh axes of a sharded array's dims, trailing unsharded dims dropped."""
  axes = list(x.sharding.spec)
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def tree_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def random_adapters(params, seed=1):
  """The adapters of `params` replaced by random values (B no longer zero)."""
  base, adapters = lora.split(params)
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return lora.join(base, jax.tree.unflatten(treedef, noisy))


def test_a_fresh_adapter_leaves_the_base_model_exactly():
  c = small_config()
  base_config = lora.without_lora(c.model)
  tokens = jnp.asarray(fixed_batch(c)['inputs'])
  params = init(c.model, tokens)
  base_params = init(base_config, tokens)
  base, adapters = lora.split(params)
  # The base weights are those of the same seed without LoRA, and the adapters are apart.
  assert tree_equal(base, base_params)
  assert tree_equal(lora.join(base, adapters), params)
  assert set(adapters['layers']['attention']) == {'wq_lora', 'wk_lora', 'wv_lora', 'wo_lora'}
  assert adapters['layers']['attention']['wo_lora']['a'].shape == (2, 4, 8, 4)  # [N, H, d, r]
  assert adapters['layers']['attention']['wk_lora']['b'].shape == (2, 4, 2, 8)  # [N, r, K, d]
  assert sum(x.size for x in jax.tree.leaves(params)) == param_count(c.model)
  np.testing.assert_array_equal(
      logits(c.model, params, tokens),
      logits(base_config, base_params, tokens),
  )


def run(config, devices, steps):
  """(metrics per step, initial state, final state, shardings) on a mesh of `devices`."""
  model = Decoder(config.model)
  tx, schedule = make_optimizer(config.optimizer, total_steps=steps)
  mesh, rules = make_mesh(config.mesh, devices), logical_rules(config.mesh)
  state, shardings = create_train_state(
      model, tx, config.train.seq_len, jax.random.key(0), mesh, rules
  )
  initial = jax.device_get(state)
  step = make_train_step(model, tx, schedule, config.train, 0.0, mesh, shardings)
  history = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = global_batch(fixed_batch(config), mesh, rules)
    for _ in range(steps):
      state, metrics = step(state, batch)
      history.append(float(metrics['loss']))
  return history, initial, state, shardings


@pytest.fixture(scope='module')
def lora_run():
  return run(small_config(), jax.devices()[:1], steps=6)


def test_training_changes_only_the_adapters_and_lowers_the_loss(lora_run):
  losses, initial, state, _ = lora_run
  assert losses[-1] < losses[0] - 0.1
  base0, adapters0 = lora.split(initial.params)
  base, adapters = lora.split(jax.device_get(state.params))
  assert tree_equal(base, base0)  # bit for bit
  changed = jax.tree.map(lambda x, y: not np.array_equal(x, y), adapters0, adapters)
  assert all(jax.tree.leaves(changed)), changed


def test_the_optimizer_state_holds_moments_of_the_adapters_only(lora_run):
  _, initial, _, _ = lora_run
  _, adapters = lora.split(initial.params)
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
  moments = [x for x in jax.tree.leaves(initial.opt_state) if x.ndim]  # not the counters
  assert sum(x.nbytes for x in moments) == 2 * adapter_bytes  # AdamW's m and v
  assert len(moments) == 2 * len(jax.tree.leaves(adapters))
  # Full fine-tuning (rank 0) keeps m and v of every parameter.
  full = small_config(rank=0)
  model, (tx, _) = Decoder(full.model), make_optimizer(full.optimizer, 1)
  mesh = make_mesh(full.mesh, jax.devices()[:1])
  state, _ = create_train_state(model, tx, 16, jax.random.key(0), mesh, logical_rules(full.mesh))
  full_moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert sum(x.nbytes for x in full_moments) == 2 * param_count(full.model) * 4


def test_the_plan_counts_the_real_state_of_lora_and_of_full_fine_tuning(lora_run):
  _, initial, _, _ = lora_run
  estimate = estimate_memory(small_config(), 1)
  _, adapters = lora.split(initial.params)
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
  assert estimate.state == sum(x.nbytes for x in jax.tree.leaves(initial))  # every leaf
  assert estimate.params == sum(x.nbytes for x in jax.tree.leaves(initial.params))
  assert estimate.params - estimate.frozen_params == adapter_bytes
  assert estimate.gradients == adapter_bytes
  # m and v of the adapters (the other test counts them), and the optimizer's counters.
  assert estimate.optimizer == sum(x.nbytes for x in jax.tree.leaves(initial.opt_state))
  assert estimate.optimizer < 2 * adapter_bytes + 64
  full = estimate_memory(small_config(rank=0), 1)
  assert full.gradients == full.params == 4 * param_count(small_config(rank=0).model)
  assert 2 * full.params < full.optimizer < 2 * full.params + 64 and full.frozen_params == 0


def test_sharded_with_accumulation_equals_one_device_and_adapters_shard_like_weights(lora_run):
  losses, _, _, _ = lora_run
  c = small_config(data=2, fsdp=2, tensor=2, grad_accum_steps=2)
  sharded_losses, _, state, _ = run(c, jax.devices(), steps=6)
  np.testing.assert_allclose(sharded_losses, losses, rtol=2e-5)
  attention = state.params['layers']['attention']
  # A takes the weight's input axes, B its output axes; the rank and 'layers' stay whole.
  assert spec(attention['wq_lora']['a']) == P(None, 'fsdp')
  assert spec(attention['wq_lora']['b']) == P(None, None, 'tensor')
  assert spec(attention['wo_lora']['a']) == P(None, 'tensor')
  assert spec(attention['wo_lora']['b']) == P(None, None, 'fsdp')
  assert spec(state.params['layers']['mlp']['w_down_lora']['a']) == P(None, 'tensor')


def adapter_grads(config, params, batch):
  model = Decoder(config.model)
  adapters, frozen = lora.trainable(params)
  return jax.jit(jax.grad(lambda a: _loss_sums(lora.join(frozen, a), batch, model, 0.0)[0]))(
      adapters
  )


@pytest.mark.slow  # three compiles of the step; the base model's policies: test_model
def test_remat_policies_give_the_same_adapter_gradients():
  c = small_config()
  batch = {k: jnp.asarray(v) for k, v in fixed_batch(c).items()}
  params = random_adapters(init(c.model, batch['inputs']))
  expected = adapter_grads(c, params, batch)
  for policy in ('full', 'dots_no_batch'):
    c.model.remat_policy = policy
    got = adapter_grads(c, params, batch)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      # Recomputation may reassociate float32 sums: equal to float32 rounding.
      np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max(), err_msg=policy)


def test_merged_weights_give_the_lora_models_logits():
  c = small_config()
  tokens = jnp.asarray(fixed_batch(c)['inputs'])
  params = random_adapters(init(c.model, tokens))
  merged = lora.merge(params, c.model)
  assert not lora.split(merged)[1]
  # One weight against float64 numpy: W + alpha / r * A @ B, layer 1 of the output projection.
  attention = jax.device_get(params['layers']['attention'])
  a, b = (np.float64(attention['wo_lora'][k][1]) for k in 'ab')
  expected = np.float64(attention['wo'][1]) + 8.0 / 4 * np.einsum('hdr,re->hde', a, b)
  np.testing.assert_allclose(merged['layers']['attention']['wo'][1], expected, rtol=1e-6, atol=1e-7)
  one_layer = lora.merge_weight(
      attention['wo'][1], attention['wo_lora']['a'][1], attention['wo_lora']['b'][1], 2.0
  )  # a per-layer tensor, as a streaming export reads it
  np.testing.assert_array_equal(one_layer, merged['layers']['attention']['wo'][1])
  lora_logits = logits(c.model, params, tokens)
  merged_logits = logits(lora.without_lora(c.model), merged, tokens)
  base_logits = logits(lora.without_lora(c.model), lora.split(params)[0], tokens)
  assert np.abs(lora_logits - base_logits).max() > 1e-2  # the adapters matter
  np.testing.assert_allclose(merged_logits, lora_logits, atol=1e-5, rtol=0)


def test_adapters_alone_are_a_checkpoint_and_start_from_a_base(tmp_path):
  c = small_config()
  model = Decoder(c.model)
  tokens = jnp.asarray(fixed_batch(c)['inputs'])
  params = random_adapters(init(c.model, tokens))
  base, adapters = lora.split(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'adapters', adapters)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / 'adapters')
  assert tree_equal(restored, adapters)
  np.testing.assert_array_equal(
      logits(c.model, lora.join(base, restored), tokens),
      logits(c.model, params, tokens),
  )
  # A base model's params (no adapters) get fresh, sharded adapters and an optimizer state
  # of the adapters alone.
  tx, _ = make_optimizer(c.optimizer, 1)
  mesh, rules = make_mesh(c.mesh, jax.devices()[:1]), logical_rules(c.mesh)
  _, shardings = create_train_state(model, tx, 16, jax.random.key(0), mesh, rules)
  joined = with_fresh_adapters(base, model, 16, jax.random.key(0), mesh, rules, shardings.params)
  state = train_state_from_params(joined, tx, shardings)
  assert tree_equal(lora.split(jax.device_get(joined))[0], base)
  assert not np.any(jax.device_get(joined)['layers']['mlp']['w_up_lora']['b'])
  assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(adapters)


def test_the_step_computes_no_weight_gradients_of_frozen_weights():
  """XLA's FLOP count of the compiled steps: LoRA saves what the analytic count says. One
  layer: XLA counts a loop's body once, whatever its trip count."""
  flops = {}
  for rank in (0, 4):
    c = small_config(rank=rank)
    c.model.vocab_size, c.model.embed_dim, c.model.mlp_dim = 1024, 64, 256
    c.model.num_layers = 1
    c.train.seq_len = 64
    model, (tx, schedule) = Decoder(c.model), make_optimizer(c.optimizer, 1)
    mesh, rules = make_mesh(c.mesh, jax.devices()[:1]), logical_rules(c.mesh)
    state, shardings = create_train_state(model, tx, 64, jax.random.key(0), mesh, rules)
    step = make_train_step(model, tx, schedule, c.train, 0.0, mesh, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      compiled = step.lower(state, global_batch(fixed_batch(c), mesh, rules)).compile()
    cost = compiled.cost_analysis()
    flops[rank] = (cost[0] if isinstance(cost, list) else cost)['flops']
    analytic = train_flops_per_token(c.model, 64) * 8 * 64
    # Matmuls dominate; the rest (norms, softmax, AdamW) is a few percent.
    assert analytic <= flops[rank] <= 1.15 * analytic, (rank, flops[rank], analytic)
  assert flops[4] < 0.8 * flops[0]


@pytest.mark.parametrize(
    'overrides,message',
    [
        ({'model.lora_rank': -1}, 'model.lora_rank=-1 must be >= 0'),
        ({'model.lora_targets': 'q,qq'}, 'unknown: qq'),
        ({'model.lora_targets': 'q,v,q'}, "model.lora_targets='q,v,q' must name each"),
        ({'model.lora_targets': ' '}, 'model.lora_targets'),
        ({'model.lora_alpha': 0.0}, 'model.lora_alpha=0.0 must be > 0'),
        ({'model.lora_alpha': float('nan')}, 'model.lora_alpha=nan'),
        ({'model.lora_rank': 17, 'model.lora_targets': 'k,up'}, 'than the k projection (16)'),
        ({'optimizer.decay_embeddings': True}, 'optimizer.decay_embeddings=True has no effect'),
    ],
)
def test_validate_refuses_bad_lora_settings(overrides, message):
  c = small_config()
  validate(c, 1)  # the base of every case is valid
  for path, value in overrides.items():
    section, field = path.split('.')
    c[section][field] = value
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    validate(c, 1)


def test_lora_from_an_imported_model_trains_and_exports_merged(tmp_path):
  """Import a Llama, fine-tune LoRA adapters from it (train.init_from), export: the base
  weights stay the imported ones, and transformers on the export (adapters merged into
  plain LlamaForCausalLM weights) gives the adapted checkpoint's logits."""
  import shutil  # pylint: disable=g-import-not-at-top

  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  from euro_lm import hf  # pylint: disable=g-import-not-at-top
  from euro_lm.checkpoint import load_params  # pylint: disable=g-import-not-at-top
  from euro_lm.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  from euro_lm.hf.check import compare_with_transformers  # pylint: disable=g-import-not-at-top
  from euro_lm.train.loop import train  # pylint: disable=g-import-not-at-top
  from tests.hf_tokenizers import make_tokenizer_folder  # pylint: disable=g-import-not-at-top
  from tests.test_hf import HF_SHAPES, random_hf_model  # pylint: disable=g-import-not-at-top

  quiet = lambda *_: None  # noqa: E731
  tokenizer = make_tokenizer_folder('llama3', tmp_path / 'tokenizer')
  hf_dir = tmp_path / 'hf'
  vocab_size = load_tokenizer(tokenizer).vocab_size
  random_hf_model({**HF_SHAPES['gqa_untied'], 'vocab_size': vocab_size}).save_pretrained(hf_dir)
  for file in (tmp_path / 'tokenizer').iterdir():
    shutil.copy(file, hf_dir)
  config = hf.import_hf(str(hf_dir), str(tmp_path / 'imported'), log=quiet)
  config.update_from_flattened_dict(
      {
          'model.lora_rank': 4,
          'model.lora_targets': 'q,v,down',
          'train.steps': 2,
          'train.global_batch_size': 8,
          'train.seq_len': 32,
          'train.eval_every': 0,
          'train.checkpoint_every': 2,
          'data.languages': 'deu_Latn,fra_Latn',
          'optimizer.learning_rate': 3e-2,
          'optimizer.warmup_steps': 0,
      }
  )
  workdir = tmp_path / 'lora'
  train(config, str(workdir))

  base_config = config.model.copy_and_resolve_references()
  base_config.lora_rank = 0
  shapes = jax.eval_shape(
      lambda r: nn.unbox(Decoder(base_config).init(r, jnp.zeros((1, 1), jnp.int32))['params']),
      jax.random.key(0),
  )
  imported, _ = load_params(str(tmp_path / 'imported'), shapes)
  shapes = jax.eval_shape(
      lambda r: nn.unbox(Decoder(config.model).init(r, jnp.zeros((1, 1), jnp.int32))['params']),
      jax.random.key(0),
  )
  tuned, _ = load_params(str(workdir), shapes)
  base, adapters = lora.split(tuned)
  assert tree_equal(base, imported)  # frozen
  assert sorted(adapters['layers']['attention']) == ['wq_lora', 'wv_lora']
  assert np.abs(np.asarray(adapters['layers']['attention']['wq_lora']['b'])).max() > 0

  export = tmp_path / 'export'
  hf.export_hf(str(workdir), str(export), dtype='float32', log=quiet)
  check = compare_with_transformers(str(export), str(workdir), log=quiet)
  assert check['max_abs_diff'] < 1e-4 and check['argmax_agreement'] == 1
  original = safetensors.numpy.load_file(str(hf_dir / 'model.safetensors'))
  exported = {}
  for shard in export.glob('*.safetensors'):
    exported.update(safetensors.numpy.load_file(str(shard)))
  assert not np.array_equal(
      exported['model.layers.0.self_attn.q_proj.weight'],
      original['model.layers.0.self_attn.q_proj.weight'],
  )  # the adapters are in
  np.testing.assert_array_equal(
      exported['model.layers.0.self_attn.k_proj.weight'],
      original['model.layers.0.self_attn.k_proj.weight'],
  )  # untargeted weights are the base's
