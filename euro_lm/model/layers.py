"""Llama-family decoder layers (Flax linen), with logical axis names on every weight.

Weights are laid out like Hugging Face's Llama up to a reshape and transpose: q/k/v are
`[embed, heads, head_dim]`, the output projection `[heads, head_dim, embed]`, and RoPE
uses the rotate-half form, so export never permutes.

Decoding: Attention and Block also take a per-layer KV cache (`layer_cache`, K and V of
`[B, S, K, head_dim]` over S cache slots) and the shared `decode` context
`(index, kv_valid_BS)`: the new tokens go to slots `index, index + 1, ...`, and a query at
slot i sees the slots j <= i that `kv_valid_BS` marks as holding a real token. Training
never passes them and is unchanged.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from euro_lm import softcap as softcap_lib
from euro_lm.model import fp8, lora
from euro_lm.model.attention import attention, head_dim


def _param(module, name, shape, logical_axes, init):
  return module.param(name, nn.with_logical_partitioning(init, logical_axes), shape, jnp.float32)


def _constrain(x, logical_axes):
  return nn.with_logical_constraint(x, logical_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x, w, in_axes=1, dtype=None):
  """A projection: contracts x's last `in_axes` axes with w's first `in_axes` axes, with w
  cast to `dtype` (default: x's) for the matmul.

  The forward is the einsum's. The backward is written out: autodiff's weight gradient,
  `transpose(dot(g, x))`, became on XLA:CPU a dot over a transposed copy of the activation
  gradient, fused into (and slowing) the elementwise op that produces it (BENCHMARKS.md).
  Here it is one 2-D dot over the flattened tokens, `x^T g`, which GEMMs take without a
  copy. That dot accumulates and outputs float32, cast only to w's own dtype: XLA sums a
  sharded dot's partial results across devices in its output dtype, so a float32 weight's
  gradient is reduced over data and fsdp in float32, not in the compute dtype.
  """
  return _dot(x, w.astype(dtype or x.dtype), in_axes)


def _dot(x, w, in_axes):
  contract = tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes))
  return jax.lax.dot_general(x, w, (contract, ((), ())))


def _dense_fwd(x, w, in_axes, dtype):
  # The dot itself, not `dense`: a remat policy sees a dot_general here and may save its
  # output; a nested `dense` call would hide it (`dots` policies then recomputed every
  # projection, as `full` does). The cast weight is kept, as small as it is, and an empty
  # array of w's own dtype, the type of its gradient.
  w_cast = w.astype(dtype or x.dtype)
  return _dot(x, w_cast, in_axes), (x, w_cast, jnp.zeros((0,), w.dtype))


def _dense_bwd(in_axes, dtype, residuals, g):
  del dtype
  x, w, w_type = residuals
  fan_in = math.prod(w.shape[:in_axes])
  x_NI = x.reshape(-1, fan_in)
  g_NO = g.reshape(x_NI.shape[0], -1)
  w_IO = w.reshape(fan_in, g_NO.shape[1])
  dx_NI = jax.lax.dot_general(g_NO, w_IO, (((1,), (1,)), ((), ())))
  dw_IO = jax.lax.dot_general(
      x_NI, g_NO, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )
  return dx_NI.reshape(x.shape), dw_IO.reshape(w.shape).astype(w_type.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def swiglu(gate, up):
  """`silu(gate) * up`, whose backward keeps only its two inputs.

  Autodiff kept six gate-sized arrays per layer (the sigmoid, silu, products...), each
  one more buffer to fill and stack across the layer scan; the sigmoid is cheap to redo.
  """
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
  gate, up = residuals
  gate32 = gate.astype(jnp.float32)
  sigmoid = jax.nn.sigmoid(gate32)
  silu = gate32 * sigmoid
  g32 = g.astype(jnp.float32)
  d_gate = g32 * up.astype(jnp.float32) * sigmoid * (1 + gate32 * (1 - sigmoid))
  return d_gate.astype(gate.dtype), (g32 * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def geglu(gate, up):
  """`gelu_tanh(gate) * up` (GeGLU; torch's gelu with approximate='tanh', as Gemma's
  gelu_pytorch_tanh), whose backward, like `swiglu`'s, keeps only its two inputs."""
  return jax.nn.gelu(gate, approximate=True) * up


def _geglu_fwd(gate, up):
  return geglu(gate, up), (gate, up)


def _geglu_bwd(residuals, g):
  gate, up = residuals
  gate32 = gate.astype(jnp.float32)
  # The activation and its derivative in one elementwise pass.
  gelu, d_gelu = jax.jvp(
      functools.partial(jax.nn.gelu, approximate=True), (gate32,), (jnp.ones_like(gate32),)
  )
  g32 = g.astype(jnp.float32)
  return (g32 * up.astype(jnp.float32) * d_gelu).astype(gate.dtype), (g32 * gelu).astype(up.dtype)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


class Adapter(nn.Module):
  """A LoRA adapter of one weight (`euro_lm.model.lora`): `scale * (x A) B`, A `[in..., r]`
  (uniform in +-1/sqrt(fan_in), as PEFT) and B `[r, out...]` (zeros), float32 params cast
  to the compute dtype; `in_axes`/`out_axes` are the weight's logical axes."""

  rank: int
  scale: float
  in_axes: tuple
  out_axes: tuple
  out_shape: tuple
  dtype: str

  @nn.compact
  def __call__(self, x):
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    bound = math.prod(in_shape) ** -0.5
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    a = _param(self, 'a', (*in_shape, self.rank), (*self.in_axes, None), uniform)
    b = _param(
        self, 'b', (self.rank, *self.out_shape), (None, *self.out_axes), nn.initializers.zeros
    )
    dtype = jnp.dtype(self.dtype)
    h = dense(x, a, in_axes=n_in, dtype=dtype)
    return dense(h, b, dtype=dtype) * jnp.asarray(self.scale, dtype)


def project(module, target, x, w, in_axes, out_axes):
  """`x W` in the compute dtype (in fp8 where `euro_lm.model.fp8.active`), contracting x's
  last `len(in_axes)` axes; plus the LoRA adapter of `target` (a `lora.TARGETS` key) when
  the config targets it. `in_axes` and `out_axes` are W's logical axes."""
  cfg = module.config
  name = lora.TARGETS[target][1]
  if fp8.active(module):
    y = fp8.dot(name + fp8.SUFFIX, x, w.astype(cfg.compute_dtype), len(in_axes))
  else:
    y = dense(x, w, in_axes=len(in_axes), dtype=cfg.compute_dtype)
  if target not in lora.targets(cfg):
    return y
  adapter = Adapter(
      cfg.lora_rank,
      lora.scale(cfg),
      in_axes,
      out_axes,
      w.shape[len(in_axes) :],
      cfg.compute_dtype,
      name=name + lora.SUFFIX,
  )
  return y + adapter(x)


# model.mlp_activation of a gated MLP -> its activation times the up projection.
GATED_ACTIVATIONS = {'silu': swiglu, 'gelu_tanh': geglu}
# Every model.mlp_activation: the gated ones, and xIELU on the up projection alone (Apertus;
# `lora.has_gate` says which).
MLP_ACTIVATIONS = (*GATED_ACTIVATIONS, 'xielu')


# xIELU's per-layer scalars: (initial value as Apertus', shape as Apertus stores it).
# alpha_p and alpha_n are stored before softplus (alpha_n less beta) and train; beta and
# eps are constants.
XIELU_SCALARS = {
    'xielu_alpha_p': (math.log(math.expm1(0.8)), (1,)),
    'xielu_alpha_n': (math.log(math.expm1(0.8 - 0.5)), (1,)),
    'xielu_beta': (0.5, ()),
    'xielu_eps': (-1e-6, ()),
}


# Rematerialised: its backward keeps the input, not the float32 intermediates.
@jax.checkpoint
def xielu(x, alpha_p, alpha_n, beta, eps):
  """xIELU (arXiv:2411.13010, Apertus' MLP activation), in float32: `a_p x^2 + beta x` for
  x > 0, else `a_n (expm1(min(x, eps)) - x) + beta x`, where a_p = softplus(alpha_p) and
  a_n = beta + softplus(alpha_n)."""
  x32 = x.astype(jnp.float32)
  a_p, a_n = jax.nn.softplus(alpha_p), beta + jax.nn.softplus(alpha_n)
  negative = (jnp.expm1(jnp.minimum(x32, eps)) - x32) * a_n
  return (jnp.where(x32 > 0, a_p * x32 * x32, negative) + beta * x32).astype(x.dtype)


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32, over the last axis. With `plus_one` (Gemma)
  it scales by `1 + scale` (in float32, before the cast back) and `scale` starts at 0."""

  eps: float
  logical_axis: str = 'embed'
  plus_one: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = _param(self, 'scale', (x.shape[-1],), (self.logical_axis,), init)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def norm(cfg, name, logical_axis='embed'):
  """The model's RMSNorm (`model.norm_eps`, `model.norm_plus_one`) named `name`."""
  return RMSNorm(cfg.norm_eps, logical_axis, cfg.get('norm_plus_one', False), name=name)


def local_layers(cfg):
  """Per layer, whether it is local: attends within `model.sliding_window` (if set) with
  RoPE base `model.rope_local_theta` (if set). With `model.sliding_window_pattern` N every
  Nth layer is global instead (full attention, `rope_theta` and its scaling); without, all
  layers are local, so `sliding_window` alone windows every layer (Mistral). `cfg`: a
  ConfigDict or a dict."""
  return _all_but_every_nth(cfg['num_layers'], cfg.get('sliding_window_pattern', 0))


def rope_layers(cfg):
  """Per layer, whether it rotates queries and keys: with `model.nope_interval` N every
  Nth layer has no position embedding (NoPE: causal masking alone orders the tokens)."""
  return _all_but_every_nth(cfg['num_layers'], cfg.get('nope_interval', 0))


def _all_but_every_nth(num_layers, n):
  """Per layer, False for layers n, 2n, ... (counted from 1), True for the others (all
  where n is 0)."""
  return tuple(not n or (i + 1) % n != 0 for i in range(num_layers))


ROPE_SCALINGS = ('none', 'linear', 'llama3', 'yarn')


def rope_frequencies(cfg):
  """RoPE's `head_dim / 2` inverse frequencies, float32, with the config's scaling: 'linear'
  divides them all by the factor; 'llama3' (Llama 3.1+) divides the low frequencies, keeps
  the high ones, and blends in between, as Hugging Face's 'llama3' rope_type does; 'yarn'
  blends the same way over a range of dimensions set by how often each turns within the
  original context (`rope_yarn_beta_*`), as its 'yarn' rope_type does (and scales cos and
  sin: `rope_attention_factor`)."""
  hd = head_dim(cfg)
  inv_freq = cfg.rope_theta ** -(jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  scaling = cfg.get('rope_scaling', 'none')
  if scaling == 'linear':
    return inv_freq / cfg.rope_scaling_factor
  if scaling == 'yarn':
    return _yarn_frequencies(cfg, inv_freq, hd)
  if scaling == 'llama3':
    factor, original = cfg.rope_scaling_factor, cfg.rope_original_max_positions
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return jnp.where(medium, blended, scaled)
  return inv_freq


def _yarn_frequencies(cfg, inv_freq, hd):
  """YaRN: dimensions that turn more than `rope_yarn_beta_fast` times within the original
  context keep their frequency, those under `rope_yarn_beta_slow` times are divided by the
  factor, and a linear ramp over the dimensions blends the two in between."""

  def dimension(turns):  # the dimension that turns `turns` times within the original context
    original = cfg.rope_original_max_positions
    return hd * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  low = dimension(cfg.get('rope_yarn_beta_fast', 32.0))
  high = dimension(cfg.get('rope_yarn_beta_slow', 1.0))
  if cfg.get('rope_yarn_truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, hd - 1)
  high = high + 0.001 if low == high else high
  scaled = jnp.clip((jnp.arange(hd // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  return inv_freq / cfg.rope_scaling_factor * scaled + inv_freq * (1 - scaled)


def rope_attention_factor(cfg):
  """What RoPE multiplies cos and sin by: YaRN's `model.rope_attention_factor`, where 0 is
  its paper's `0.1 * ln(factor) + 1`; 1 for every other scaling. `cfg`: the model section
  (a ConfigDict or a dict)."""
  if cfg.get('rope_scaling', 'none') != 'yarn':
    return 1.0
  return cfg.get('rope_attention_factor', 0.0) or yarn_mscale(cfg['rope_scaling_factor'])


def yarn_mscale(factor, mscale=1.0):
  """YaRN's `0.1 * mscale * ln(factor) + 1` (1 where the factor does not extend the context)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def scale_queries(cfg, q_BLHd, positions_BL):
  """Queries times `1 + beta * ln(1 + floor(position / original context))` with beta
  `model.query_scale_beta` (Llama 4's and Ministral 3's scaling for long contexts: the
  softmax sharpens as positions pass each multiple of the original context); as they are
  where beta is 0."""
  beta = cfg.get('query_scale_beta', 0.0)
  if not beta:
    return q_BLHd
  periods_BL = jnp.floor(positions_BL.astype(jnp.float32) / cfg.rope_original_max_positions)
  scale_BL = (1 + beta * jnp.log1p(periods_BL)).astype(q_BLHd.dtype)
  return q_BLHd * scale_BL[:, :, None, None]


def local_rope_frequencies(cfg):
  """The local layers' RoPE inverse frequencies: unscaled, base `model.rope_local_theta`;
  the global ones (`rope_frequencies`) where that is 0."""
  theta = cfg.get('rope_local_theta', 0.0)
  if not theta:
    return rope_frequencies(cfg)
  hd = head_dim(cfg)
  return theta ** -(jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)


def rope(x_BLHd, positions_BL, inv_freq, attention_factor=1.0):
  """Rotary embedding, rotate-half form (as in Hugging Face Llama), in float32, with the
  inverse frequencies of `rope_frequencies` and cos and sin times `attention_factor`
  (`rope_attention_factor`)."""
  angles_BLd = positions_BL[..., None].astype(jnp.float32) * inv_freq
  angles_BL1D = jnp.concatenate([angles_BLd, angles_BLd], axis=-1)[:, :, None, :]
  x32 = x_BLHd.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = (f(angles_BL1D) * attention_factor for f in (jnp.cos, jnp.sin))
  out = x32 * cos + rotated * sin
  return out.astype(x_BLHd.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and optional QK-norm.

  Layers differ only where `local_layers` says some are local and some global: then the
  layer's index (a traced scalar inside the layer scan) picks the RoPE frequencies, and a
  `lax.cond` between two attention calls, each with its static window, picks the
  attention, so every implementation gets the window it already takes. Where `rope_layers`
  says some layers have no position embedding, the index picks the queries and keys as
  they are there.
  """

  config: ml_collections.ConfigDict  # the `model` section

  @nn.compact
  def __call__(
      self, x_BLD, segment_ids_BL, positions_BL, layer_index=None, layer_cache=None, decode=None
  ):
    """Returns the output `[B, L, D]`, and with a `layer_cache` also the updated cache."""
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    d, h, k, hd = x_BLD.shape[-1], cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    window = cfg.get('sliding_window', 0) or None
    scale = (cfg.get('query_pre_attn_scalar', 0) or hd) ** -0.5
    softcap = cfg.get('attn_logit_softcap', 0.0)
    local = local_layers(cfg)
    mixed = len(set(local)) > 1
    is_local = jnp.asarray(local)[layer_index] if mixed else local[0]
    init = nn.initializers.normal(cfg.init_std)
    wq_DHd = _param(self, 'wq', (d, h, hd), ('embed', 'heads', 'head_dim'), init)
    wk_DKd = _param(self, 'wk', (d, k, hd), ('embed', 'kv_heads', 'head_dim'), init)
    wv_DKd = _param(self, 'wv', (d, k, hd), ('embed', 'kv_heads', 'head_dim'), init)
    wo_HdD = _param(self, 'wo', (h, hd, d), ('heads', 'head_dim', 'embed'), init)

    q_BLHd = project(self, 'q', x_BLD, wq_DHd, ('embed',), ('heads', 'head_dim'))
    k_BLKd = project(self, 'k', x_BLD, wk_DKd, ('embed',), ('kv_heads', 'head_dim'))
    v_BLKd = project(self, 'v', x_BLD, wv_DKd, ('embed',), ('kv_heads', 'head_dim'))
    if cfg.get('qkv_bias', False):
      zeros = nn.initializers.zeros
      q_BLHd += _param(self, 'bq', (h, hd), ('heads', 'head_dim'), zeros).astype(dtype)
      k_BLKd += _param(self, 'bk', (k, hd), ('kv_heads', 'head_dim'), zeros).astype(dtype)
      v_BLKd += _param(self, 'bv', (k, hd), ('kv_heads', 'head_dim'), zeros).astype(dtype)
    if cfg.qk_norm:
      q_BLHd = norm(cfg, 'q_norm', 'head_dim')(q_BLHd)
      k_BLKd = norm(cfg, 'k_norm', 'head_dim')(k_BLKd)
    inv_freq = jnp.where(is_local, local_rope_frequencies(cfg), rope_frequencies(cfg))
    # Local layers with their own base are unscaled; else they rotate as the global ones.
    factor = global_factor = rope_attention_factor(cfg)
    local_factor = 1.0 if cfg.get('rope_local_theta', 0.0) else global_factor
    if mixed:
      factor = jnp.where(is_local, local_factor, global_factor)
    elif is_local:
      factor = local_factor
    rotated = rope_layers(cfg)
    if all(rotated):
      q_BLHd, k_BLKd = (rope(x, positions_BL, inv_freq, factor) for x in (q_BLHd, k_BLKd))
    else:
      rotates = jnp.asarray(rotated)[layer_index]
      q_BLHd, k_BLKd = (
          jnp.where(rotates, rope(x, positions_BL, inv_freq, factor), x) for x in (q_BLHd, k_BLKd)
      )
    q_BLHd = _constrain(
        scale_queries(cfg, q_BLHd, positions_BL), ('batch', 'length', 'heads', 'head_dim')
    )
    k_BLKd = _constrain(k_BLKd, ('batch', 'length', 'kv_heads', 'head_dim'))
    v_BLKd = _constrain(v_BLKd, ('batch', 'length', 'kv_heads', 'head_dim'))

    if layer_cache is not None:
      index, kv_valid_BS = decode
      k_BSKd, v_BSKd = (
          jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, index, 0, 0))
          for c, new in zip(layer_cache, (k_BLKd, v_BLKd))
      )
      if window and mixed:  # a plain mask here: the window may be traced
        window = jnp.where(is_local, window, k_BSKd.shape[1] + 1)
      elif not local[0]:
        window = None
      out_BLHd = cached_attention(
          q_BLHd, k_BSKd, v_BSKd, index, kv_valid_BS, window, scale, softcap
      )
      out_BLD = project(self, 'o', out_BLHd, wo_HdD, ('heads', 'head_dim'), ('embed',))
      return out_BLD, (k_BSKd, v_BSKd)

    def attend(window, q_BLHd, k_BLKd, v_BLKd, segment_ids_BL):
      return attention(
          q_BLHd,
          k_BLKd,
          v_BLKd,
          segment_ids_BL=segment_ids_BL,
          causal=True,
          scale=scale,
          impl=cfg.attention_impl,
          pallas_backend=cfg.get('pallas_backend', 'auto'),
          window=window,
          softcap=softcap,
      )

    args = (q_BLHd, k_BLKd, v_BLKd, segment_ids_BL)
    if window and mixed:
      out_BLHd = jax.lax.cond(
          is_local, functools.partial(attend, window), functools.partial(attend, None), *args
      )
    else:
      out_BLHd = attend(window if local[0] else None, *args)
    return project(self, 'o', out_BLHd, wo_HdD, ('heads', 'head_dim'), ('embed',))


class Mlp(nn.Module):
  """Gated feed-forward: down(act(gate(x)) * up(x)), act silu (SwiGLU) or gelu_tanh (GeGLU);
  or with xIELU, down(xielu(up(x))) and the activation's four per-layer scalars."""

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    d, f = x_BLD.shape[-1], cfg.mlp_dim
    init = nn.initializers.normal(cfg.init_std)
    gated = lora.has_gate(cfg)
    w_gate_DF = _param(self, 'w_gate', (d, f), ('embed', 'mlp'), init) if gated else None
    w_up_DF = _param(self, 'w_up', (d, f), ('embed', 'mlp'), init)
    w_down_FD = _param(self, 'w_down', (f, d), ('mlp', 'embed'), init)
    up_BLF = project(self, 'up', x_BLD, w_up_DF, ('embed',), ('mlp',))
    if gated:
      gate_BLF = project(self, 'gate', x_BLD, w_gate_DF, ('embed',), ('mlp',))
      hidden_BLF = GATED_ACTIVATIONS[cfg.get('mlp_activation', 'silu')](gate_BLF, up_BLF)
    else:
      alpha_p, alpha_n, beta, eps = (
          _param(self, name, shape, (None,) * len(shape), nn.initializers.constant(value))
          for name, (value, shape) in XIELU_SCALARS.items()
      )
      # beta and eps are constants: no gradient and no weight decay (train.optimizer), so
      # AdamW never moves them.
      beta, eps = jax.lax.stop_gradient(beta), jax.lax.stop_gradient(eps)
      hidden_BLF = xielu(up_BLF, alpha_p, alpha_n, beta, eps)
    hidden_BLF = _constrain(hidden_BLF, ('batch', 'length', 'mlp'))
    return project(self, 'down', hidden_BLF, w_down_FD, ('mlp',), ('embed',))


class Block(nn.Module):
  """Pre-norm decoder block, with `model.post_norms` also a norm on the attention and MLP
  outputs before each residual add (Gemma 2/3). Returns `(x, None)` so it can be the body
  of `nn.scan`; `layer_index` is the layer's place in the stack."""

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(
      self, x_BLD, segment_ids_BL, positions_BL, layer_index=None, layer_cache=None, decode=None
  ):
    """The scan carry `x` and, when decoding, this layer's updated KV cache."""
    cfg = self.config
    post_norms = cfg.get('post_norms', False)
    x_BLD = _constrain(x_BLD, ('batch', 'length', 'embed'))
    h_BLD = norm(cfg, 'attention_norm')(x_BLD)
    attention_out = Attention(cfg, name='attention')(
        h_BLD, segment_ids_BL, positions_BL, layer_index, layer_cache, decode
    )
    if layer_cache is not None:
      attention_out, layer_cache = attention_out
    if post_norms:
      attention_out = norm(cfg, 'attention_out_norm')(attention_out)
    x_BLD = x_BLD + attention_out
    h_BLD = norm(cfg, 'mlp_norm')(x_BLD)
    mlp_out = Mlp(cfg, name='mlp')(h_BLD)
    if post_norms:
      mlp_out = norm(cfg, 'mlp_out_norm')(mlp_out)
    x_BLD = x_BLD + mlp_out
    return _constrain(x_BLD, ('batch', 'length', 'embed')), layer_cache


def cached_attention(
    q_BLHd, k_BSKd, v_BSKd, index, kv_valid_BS, window=None, scale=None, softcap=0.0
):
  """Attention of L new queries, at cache slots `index ...`, over all S cache slots.

  A query at slot i sees slot j if j <= i (and i - j < `window`, which may be traced) and
  `kv_valid_BS[:, j]` (slots and positions differ by a row's left padding alone). Logits
  are scaled by `scale`, default head_dim ** -0.5, and soft-capped by `softcap` > 0
  (`euro_lm.softcap`). Plain einsums: at decode time L is 1
  (or the prompt, once), so a flash kernel would gain little here.
  """
  batch, length, num_heads, hd = q_BLHd.shape
  num_slots, num_kv_heads = k_BSKd.shape[1], k_BSKd.shape[2]
  q_BLKGd = q_BLHd.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, hd)
  logits_BKGLS = jnp.einsum(
      'blkgd,bskd->bkgls', q_BLKGd, k_BSKd, preferred_element_type=jnp.float32
  ) * (hd**-0.5 if scale is None else scale)
  logits_BKGLS = softcap_lib.apply(logits_BKGLS, softcap)
  query_slot_L1 = (index + jnp.arange(length))[:, None]
  offset_LS = query_slot_L1 - jnp.arange(num_slots)[None, :]
  visible_LS = (offset_LS >= 0) & (offset_LS < window) if window is not None else offset_LS >= 0
  mask_BLS = visible_LS[None] & kv_valid_BS[:, None, :]
  mask_B11LS = mask_BLS[:, None, None]
  logits_BKGLS = jnp.where(mask_B11LS, logits_BKGLS, jnp.finfo(jnp.float32).min)
  # A padding query sees nothing: zero output, as in the training attention.
  probs_BKGLS = jnp.where(mask_B11LS, jax.nn.softmax(logits_BKGLS, axis=-1), 0.0)
  out_BLKGd = jnp.einsum(
      'bkgls,bskd->blkgd',
      probs_BKGLS.astype(v_BSKd.dtype),
      v_BSKd,
      preferred_element_type=jnp.float32,
  )
  return out_BLKGd.reshape(batch, length, num_heads, hd).astype(q_BLHd.dtype)
