"""Sampling and batched generation, jitted once per (shapes, sampling settings).

Prompts are LEFT-padded to a common length P, so every row's last prompt token sits at
slot P - 1 and every decode step writes the same cache slot for all rows; each row's RoPE
positions start at 0 on its first real token (position = slot - padding). Padding slots
are masked out of attention. A row stops after its EOS or `max_new_tokens`; the slots
after its stop hold `pad_id`.

`generate(..., use_cache=False)` recomputes the whole prefix every step instead of using
the KV cache: the reference for the cached path and the baseline of the benchmark.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from euro_lm.errors import ArgumentError
from euro_lm.model.decoder import init_cache


class Generation(NamedTuple):
  tokens_BN: jax.Array  # int32 new tokens, `pad_id` after a row's stop
  lengths_B: jax.Array  # int32 new tokens per row, the EOS included


def filter_logits(logits_BV, *, temperature=1.0, top_k=0, top_p=1.0):
  """float32 logits scaled by 1/temperature, -inf outside the top-k and the top-p nucleus.

  The nucleus is the smallest set of most likely tokens whose probability reaches
  `top_p` (always at least the most likely token). `top_k=0` and `top_p=1` turn them off.
  """
  if temperature <= 0:
    raise ArgumentError(
        f'temperature must be positive here, got {temperature} (0 is greedy: use sample_logits)'
    )
  check_settings(temperature, top_k, top_p)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
  if top_p < 1:
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token while the mass of the more likely ones is still short of top_p.
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV = mass_before_BV < top_p
    keep_BV = jnp.take_along_axis(keep_sorted_BV, jnp.argsort(order_BV, axis=-1), axis=-1)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
  return logits_BV


def check_settings(temperature, top_k, top_p):
  """Raises ArgumentError (a ValueError) naming a sampling setting out of range."""
  if temperature < 0:
    raise ArgumentError(f'temperature must be >= 0 (0 is greedy), got {temperature}')
  if not 0 < top_p <= 1:
    raise ArgumentError(f'top_p must be in (0, 1], got {top_p}')
  if top_k < 0:
    raise ArgumentError(f'top_k must be >= 0 (0 is off), got {top_k}')


def sample_logits(logits_BV, key, *, temperature=1.0, top_k=0, top_p=1.0):
  """int32 token ids `[B]`: argmax when temperature is 0, else a draw from the filtered
  softmax (see filter_logits)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)


def left_pad(prompts, pad_id, multiple=1):
  """`(tokens_BP, lengths_B)` numpy int32 arrays of token-id lists, padded on the left to
  the longest prompt's length rounded up to a multiple of `multiple`."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ArgumentError('every prompt needs at least one token (e.g. BOS)')
  length = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens_BP = np.full((len(prompts), length), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BP[row, length - len(prompt) :] = prompt
  return tokens_BP, np.array([len(p) for p in prompts], np.int32)


def generate(
    model,
    params,
    tokens_BP,
    lengths_B,
    key,
    *,
    max_new_tokens,
    eos_id,
    pad_id=0,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    use_cache=True,
    num_tokens=None,
):
  """Continues left-padded prompts (`tokens_BP`, real lengths `lengths_B`) with
  `model = Decoder(config)` and its `params`. Returns a Generation. `eos_id`: the id, or
  a sequence of ids, that ends a row (-1 or []: none). `num_tokens`: draw only ids below
  it (the tokenizer's size, when the model's vocabulary is padded)."""
  run = make_generate(
      model,
      max_new_tokens=max_new_tokens,
      eos_id=eos_id,
      pad_id=pad_id,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      use_cache=use_cache,
      num_tokens=num_tokens,
  )
  return run(params, jnp.asarray(tokens_BP, jnp.int32), jnp.asarray(lengths_B, jnp.int32), key)


def make_generate(
    model,
    *,
    max_new_tokens,
    eos_id,
    pad_id=0,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    use_cache=True,
    num_tokens=None,
):
  """The jitted `run(params, tokens_BP, lengths_B, key) -> Generation` behind generate(),
  to call repeatedly without recompiling (one compile per prompt shape)."""
  if max_new_tokens < 1:
    raise ArgumentError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  check_settings(temperature, top_k, top_p)
  settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  stop_ids = np.atleast_1d(np.asarray(eos_id, np.int32))
  sample = lambda logits_BV, key: sample_logits(logits_BV[:, :num_tokens], key, **settings)

  def run(params, tokens_BP, lengths_B, key):
    batch, prompt_len = tokens_BP.shape
    total = prompt_len + max_new_tokens
    padding_B1 = (prompt_len - lengths_B)[:, None]
    slots_1S = jnp.arange(total)[None, :]
    positions_BS = jnp.maximum(slots_1S - padding_B1, 0)
    segments_BS = (slots_1S >= padding_B1).astype(jnp.int32)  # 0 marks left padding
    tokens_BS = jnp.concatenate(
        [tokens_BP, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1
    )
    variables = {'params': params}

    if use_cache:
      logits_BPV, cache = model.apply(
          variables,
          tokens_BP,
          segments_BS[:, :prompt_len],
          positions_BS[:, :prompt_len],
          cache=init_cache(model.config, batch, total),
      )
      state = cache

      def next_logits(tokens_BS, slot, cache):
        """Logits after the token at `slot`, fed alone through the cache."""
        token_B1 = jax.lax.dynamic_slice_in_dim(tokens_BS, slot, 1, axis=1)
        position_B1 = jax.lax.dynamic_slice_in_dim(positions_BS, slot, 1, axis=1)
        logits_B1V, cache = model.apply(variables, token_B1, None, position_B1, cache=cache)
        return logits_B1V[:, 0], cache

    else:
      logits_BPV = model.apply(
          variables, tokens_BP, segments_BS[:, :prompt_len], positions_BS[:, :prompt_len]
      )
      state = ()

      def next_logits(tokens_BS, slot, state):
        """Logits after the token at `slot`, from the whole buffer (causal: later slots,
        still padding, cannot change them)."""
        logits_BSV = model.apply(variables, tokens_BS, segments_BS, positions_BS)
        return jax.lax.dynamic_index_in_dim(logits_BSV, slot, axis=1, keepdims=False), state

    def cond(carry):
      step, _, _, _, done_B, _, _ = carry
      return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
      step, tokens_BS, state, logits_BV, done_B, lengths_B, key = carry
      key, draw = jax.random.split(key)
      next_B = jnp.where(done_B, pad_id, sample(logits_BV, draw))
      slot = prompt_len + step
      tokens_BS = jax.lax.dynamic_update_slice_in_dim(tokens_BS, next_B[:, None], slot, axis=1)
      lengths_B = lengths_B + (~done_B).astype(jnp.int32)
      done_B = done_B | jnp.isin(next_B, stop_ids)
      logits_BV, state = next_logits(tokens_BS, slot, state)
      return step + 1, tokens_BS, state, logits_BV, done_B, lengths_B, key

    carry = (
        jnp.zeros((), jnp.int32),
        tokens_BS,
        state,
        logits_BPV[:, -1],
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.int32),
        key,
    )
    _, tokens_BS, _, _, _, new_lengths_B, _ = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens_BS[:, prompt_len:], new_lengths_B)

  return jax.jit(run)
