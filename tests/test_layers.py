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
