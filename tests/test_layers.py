"""The layers' written-out backwards against JAX's autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from euro_lm.model.layers import dense, swiglu


def _grads(f, *args):
  w = jnp.asarray(np.random.default_rng(9).standard_normal(f(*args).shape), jnp.float32)
  return jax.jit(
      jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=tuple(range(len(args))))
  )(*args)


@pytest.mark.parametrize(
    'x_shape,w_shape,in_axes,spec',
    [
        ((2, 5, 6), (6, 3, 4), 1, 'bld,dhk->blhk'),  # q/k/v projection
        ((2, 5, 3, 4), (3, 4, 6), 2, 'blhk,hkd->bld'),  # output projection
        ((2, 5, 6), (6, 7), 1, 'bld,df->blf'),  # MLP
    ],
)
def test_dense_matches_einsum_and_its_autodiff(x_shape, w_shape, in_axes, spec):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  np.testing.assert_allclose(dense(x, w, in_axes), jnp.einsum(spec, x, w), rtol=1e-6)
  ours = _grads(lambda x, w: dense(x, w, in_axes), x, w)
  theirs = _grads(lambda x, w: jnp.einsum(spec, x, w), x, w)
  for a, b in zip(ours, theirs):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_autodiff():
  rng = np.random.default_rng(1)
  gate, up = (jnp.asarray(rng.standard_normal((3, 4, 8)) * 3, jnp.float32) for _ in range(2))
  plain = lambda g, u: jax.nn.silu(g) * u
  np.testing.assert_allclose(swiglu(gate, up), plain(gate, up), rtol=1e-6)
  for a, b in zip(_grads(swiglu, gate, up), _grads(plain, gate, up)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_backwards_return_the_inputs_dtypes():
  x = jnp.ones((2, 3, 4), jnp.bfloat16)
  w = jnp.ones((4, 5), jnp.bfloat16)
  assert all(g.dtype == jnp.bfloat16 for g in _grads(dense, x, w))
  assert all(g.dtype == jnp.bfloat16 for g in _grads(swiglu, x, x))


def test_a_bf16_matmul_gives_its_float32_weight_an_unrounded_float32_gradient():
  """The weight gradient of a bf16 projection is the float32 sum over tokens of bf16
  products, not rounded to bf16 (which would cost ~1e-3 relative): across devices it is
  then reduced in float32 too."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 64, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((4, 64, 16)), jnp.bfloat16)
  _, vjp = jax.vjp(lambda w: dense(x, w, dtype=jnp.bfloat16), w)
  (dw,) = vjp(g)
  assert dw.dtype == jnp.float32
  exact = np.einsum('bli,blo->io', np.float64(x), np.float64(g))
  np.testing.assert_allclose(dw, exact, rtol=2e-6, atol=2e-5)
  rounded = np.float64(jnp.asarray(exact, jnp.bfloat16))
  assert np.abs(rounded - exact).max() > 100 * np.abs(np.float64(dw) - exact).max()
