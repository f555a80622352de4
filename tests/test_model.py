"""Decoder behaviour: causality, packed documents, RoPE, parameter and FLOP counts."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import tiny
from euro_lm import finite
from euro_lm.config import base_config
from euro_lm.model import Decoder, forward_flops_per_token, lora, param_count, train_flops_per_token
from euro_lm.model.layers import rope, rope_frequencies
from euro_lm.train.optimizer import make_optimizer


def small_model_config(**overrides):
  m = tiny.get_config().model
  m.vocab_size, m.num_layers, m.embed_dim, m.mlp_dim = 97, 2, 32, 48
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 8
  m.update(overrides)
  return m


class Jitted:
  """A model whose `apply` is jitted: eager op-by-op execution is slow on a CPU."""

  def __init__(self, model):
    self.apply = jax.jit(model.apply)


def init(model_config, length=16, seed=0):
  model = Decoder(model_config)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, length), jnp.int32))['params']
  return Jitted(model), params


def test_changing_a_token_never_changes_earlier_logits():
  model, params = init(small_model_config())
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
  logits = model.apply({'params': params}, tokens)
  for t in (0, 7, 15):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 97)
    new_logits = model.apply({'params': params}, changed)
    np.testing.assert_array_equal(new_logits[:, :t], logits[:, :t])
    assert not np.allclose(new_logits[:, t:], logits[:, t:])


@pytest.mark.parametrize('qk_norm,tie', [(False, True), (True, False)])
def test_packed_documents_equal_separate_runs(qk_norm, tie):
  """Packing with segment ids and per-document positions = running each document alone."""
  model, params = init(small_model_config(qk_norm=qk_norm, tie_embeddings=tie))
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 97, n) for n in (5, 7, 4)]
  tokens = np.concatenate(docs)[None]
  segment_ids = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
  positions = np.concatenate([np.arange(len(d)) for d in docs])[None]
  packed = model.apply({'params': params}, tokens, segment_ids, positions)
  start = 0
  for doc in docs:
    alone = model.apply({'params': params}, doc[None])
    np.testing.assert_allclose(packed[0, start : start + len(doc)], alone[0], atol=2e-5)
    start += len(doc)


def test_rope_depends_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

  inv_freq = 10_000.0 ** -(jnp.arange(0, 16, 2) / 16)

  def score(m, n):
    return float(jnp.sum(rope(q, jnp.array([[m]]), inv_freq) * rope(k, jnp.array([[n]]), inv_freq)))

  assert score(3, 1) == pytest.approx(score(12, 10), rel=1e-5)
  assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
  # Rotations preserve norms.
  np.testing.assert_allclose(
      jnp.linalg.norm(rope(q, jnp.array([[7]]), inv_freq)), jnp.linalg.norm(q), rtol=1e-6
  )


def test_rope_rotate_half_form():
  """Hugging Face's Llama pairs dimension i with i + D/2 (not adjacent pairs)."""
  head_dim, theta, pos = 8, 10_000.0, 5
  x = np.arange(1, head_dim + 1, dtype=np.float64)
  inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)
  angle = np.concatenate([pos * inv_freq, pos * inv_freq])
  rotated = np.concatenate([-x[head_dim // 2 :], x[: head_dim // 2]])
  expected = x * np.cos(angle) + rotated * np.sin(angle)
  config = ml_collections.ConfigDict(
      {'rope_theta': theta, 'head_dim': head_dim, 'embed_dim': 0, 'num_heads': 1}
  )
  got = rope(
      jnp.asarray(x, jnp.float32)[None, None, None], jnp.array([[pos]]), rope_frequencies(config)
  )
  np.testing.assert_allclose(got[0, 0, 0], expected, rtol=1e-5)


@pytest.mark.parametrize('scaling', ['linear', 'llama3'])
def test_rope_scaling_equals_transformers(scaling):
  """The scaled inverse frequencies equal transformers' own rope initialisation."""
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top

  params = {'rope_type': scaling, 'rope_theta': 500_000.0, 'factor': 8.0}
  if scaling == 'llama3':
    params |= {
        'low_freq_factor': 1.0,
        'high_freq_factor': 4.0,
        'original_max_position_embeddings': 8192,
    }
  hf = transformers.LlamaConfig(
      hidden_size=2048,
      num_attention_heads=32,
      head_dim=64,
      max_position_embeddings=131072,
      rope_parameters=params,
  )
  want, attention_factor = ROPE_INIT_FUNCTIONS[scaling](hf, 'cpu')
  assert attention_factor == 1.0
  config = ml_collections.ConfigDict(
      {
          'rope_theta': 500_000.0,
          'head_dim': 64,
          'embed_dim': 2048,
          'num_heads': 32,
          'rope_scaling': scaling,
          'rope_scaling_factor': 8.0,
          'rope_low_freq_factor': 1.0,
          'rope_high_freq_factor': 4.0,
          'rope_original_max_positions': 8192,
      }
  )
  got = np.asarray(rope_frequencies(config))
  assert not np.allclose(got, 500_000.0 ** -(np.arange(0, 64, 2) / 64))  # it scales
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    'tie,qk_norm,qkv_bias', [(True, False, False), (False, True, False), (True, False, True)]
)
def test_param_count_matches_initialised_model(tie, qk_norm, qkv_bias):
  config = small_model_config(tie_embeddings=tie, qk_norm=qk_norm, qkv_bias=qkv_bias)
  _, params = init(config)
  assert sum(x.size for x in jax.tree.leaves(params)) == param_count(config)


def test_flop_count_matches_hand_count():
  # tiny: V=4096, layers=4, D=256, H=4, K=2, hd=64, F=704, L=128.
  config = tiny.get_config().model
  q_k_v_o = 256 * 64 * 4 + 2 * 256 * 64 * 2 + 64 * 4 * 256  # 65536 + 65536 + 65536
  mlp = 3 * 256 * 704  # 540672
  attention = 2 * (2 * 4 * 64 * 128) // 2  # QK^T and PV, causal half
  per_layer = 2 * q_k_v_o + 2 * mlp + attention  # 393216 + 1081344 + 65536
  logits = 2 * 256 * 4096
  assert forward_flops_per_token(config, 128) == 4 * per_layer + logits == 8_257_536
  assert train_flops_per_token(config, 128) == 3 * 8_257_536
  # PaLM's and TorchTitan's convention: every query against every key.
  assert train_flops_per_token(config, 128, causal_half=False) == 3 * (8_257_536 + 4 * attention)


REMAT_TOKENS = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)


@functools.cache
def remat_gradients(policy):
  model = Decoder(small_model_config(remat_policy=policy))
  params = jax.jit(model.init)(jax.random.key(0), REMAT_TOKENS)['params']
  return jax.jit(jax.grad(lambda p: jnp.mean(model.apply({'params': p}, REMAT_TOKENS) ** 2)))(
      params
  )


@pytest.mark.parametrize(
    'policy', ['full', 'dots', 'dots_no_batch', 'save_attention_out', 'dots_and_attention']
)
def test_remat_policies_give_the_same_gradients(policy):
  tokens = REMAT_TOKENS
  reference = remat_gradients('none')  # computed once for all policies
  rematerialised = remat_gradients(policy)
  model = Decoder(small_model_config(remat_policy=policy))
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: model.apply({'params': p}, tokens).sum()))(params))
  assert 'remat' in jaxpr or 'checkpoint' in jaxpr  # the policy is really applied
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), reference, rematerialised
  )


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, params = init(small_model_config(compute_dtype='bfloat16'))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  jaxpr = str(
      jax.make_jaxpr(Decoder(small_model_config(compute_dtype='bfloat16')).apply)(
          {'params': params}, jnp.zeros((1, 16), jnp.int32)
      )
  )
  assert 'bf16[1,16,4,8]' in jaxpr  # queries are computed in bfloat16
  logits = model.apply({'params': params}, jnp.zeros((1, 16), jnp.int32))
  assert logits.dtype == jnp.float32
  reference = init(small_model_config())[0].apply({'params': params}, jnp.zeros((1, 16), jnp.int32))
  np.testing.assert_allclose(logits, reference, atol=0.05)


def layer_residuals(policy, capsys, length=16, **overrides):
  """Shapes the backward keeps per layer (the layer scan's stacked outputs) under a remat
  policy, from `jax.ad_checkpoint.print_saved_residuals`."""
  m = small_model_config(remat_policy=policy, **overrides)
  model = Decoder(m)
  tokens = jnp.zeros((3, length), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  jax.ad_checkpoint.print_saved_residuals(
      lambda p: jnp.sum(model.apply({'params': p}, tokens)), params
  )
  lines = capsys.readouterr().out.splitlines()
  stacked = f'[{m.num_layers},3,'  # [layers, batch, ...]
  return [line.split()[0].split('[')[1][:-1] for line in lines if stacked in line]


def test_dots_policies_save_every_projection_output_and_full_saves_only_the_input(capsys):
  """The projections' custom backward must leave their dots visible to the policy: before,
  `dots` and `dots_no_batch` kept none of them and recomputed every projection in the
  backward, as `full` does."""
  m = small_model_config()
  L, D, F, hd = m.num_layers, m.embed_dim, m.mlp_dim, m.head_dim
  assert layer_residuals('full', capsys) == [f'{L},3,16,{D}']  # the layer input
  projections = [f'{L},3,16,{m.num_heads},{hd}'] + [f'{L},3,16,{m.num_kv_heads},{hd}'] * 2
  projections += [f'{L},3,16,{D}'] * 2 + [f'{L},3,16,{F}'] * 2  # o, down; gate, up
  for policy in ('dots', 'dots_no_batch'):
    saved = layer_residuals(policy, capsys)
    for shape in set(projections):
      assert saved.count(shape) >= projections.count(shape), (policy, shape, saved)
  # The attention's output and float32 log-sum-exp ([layers, B, K, G, L, 1] in the xla
  # attention's one query chunk here): its backward reruns no forward.
  attention = [f'{L},3,16,{m.num_heads},{hd}', f'{L},3,{m.num_kv_heads},2,16,1']
  assert sorted(layer_residuals('save_attention_out', capsys)) == sorted(
      [f'{L},3,16,{D}'] + attention
  )
  assert sorted(layer_residuals('dots_and_attention', capsys)) == sorted(
      layer_residuals('dots_no_batch', capsys) + attention
  )
  # euro_lm's kernels (the Triton set, interpreted here): log-sum-exp [layers, B, H, L].
  pallas = layer_residuals('save_attention_out', capsys, 128, attention_impl='pallas', head_dim=16)
  assert sorted(pallas) == sorted([f'{L},3,128,{D}', f'{L},3,128,4,16', f'{L},3,4,128'])


def test_an_xielu_mlp_has_no_gate_and_adamw_keeps_its_constants():
  """Apertus' MLP: parameters and FLOPs without the gate projection; a real AdamW step
  (weight decay on) moves xIELU's alphas and leaves beta and eps exactly as they were; the
  default LoRA targets skip the missing gate."""
  config = small_model_config(mlp_activation='xielu')
  model, params = init(config)
  params = nn.unbox(params)
  assert 'w_gate' not in params['layers']['mlp']
  assert sum(x.size for x in jax.tree.leaves(params)) == param_count(config)
  gated = small_model_config()
  D, F = config.embed_dim, config.mlp_dim
  assert forward_flops_per_token(gated, 16) - forward_flops_per_token(config, 16) == 2 * 2 * D * F

  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({'params': p}, tokens) ** 2)))(params)
  optimizer_config = base_config().optimizer
  optimizer_config.weight_decay = 0.1
  tx, _ = make_optimizer(optimizer_config, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  stepped = optax.apply_updates(params, updates)
  mlp, before = stepped['layers']['mlp'], params['layers']['mlp']
  for name in ('xielu_beta', 'xielu_eps'):
    np.testing.assert_array_equal(mlp[name], before[name])
  for name in ('xielu_alpha_p', 'xielu_alpha_n'):
    assert np.all(mlp[name] != before[name])
  config.lora_rank = 2
  assert lora.targets(config) == ('q', 'k', 'v', 'o', 'up', 'down')


def test_a_nonfinite_report_names_the_layers_of_stacked_scalars():
  """A stacked leaf of one scalar per layer (xIELU's beta, `[L]`) is reported per layer,
  as the matrices are."""
  tree = {
      'layers': {
          'mlp': {'xielu_beta': jnp.array([0.5, jnp.nan, 0.5]), 'w_up': jnp.ones((3, 2, 4))},
      },
      'final_norm': {'scale': jnp.array([1.0, jnp.inf])},
  }
  assert finite.nonfinite_leaves(tree) == ['final_norm/scale', 'layers/mlp/xielu_beta (layers 1)']
