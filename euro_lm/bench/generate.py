"""`python -m euro_lm.bench.generate [--models=configs/tiny.py,configs/llama_125m.py]
[--batch=4] [--prompt_len=32] [--new_tokens=64] [--repeats=2] [--file_prompts=0]`

Generation throughput with random params, greedy, no EOS (every row runs the full length):
the KV cache (one token per step through the model) against recomputing the whole prefix
every step. Prints one table of new tokens per second (best of `--repeats`, after a
compiling run whose time is shown separately).

With `--file_prompts=N`, also a file's worth of prompts as `python -m euro_lm.generate`
answers them: N prompts of random lengths (1 to 4 x `--prompt_len`), `--batch` at a time,
compiles included, with each batch padded to its longest prompt against widths rounded up
to a multiple of `euro_lm.inference.PROMPT_WIDTH_MULTIPLE`, which lets batches share
compiled shapes.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import linen as nn

from euro_lm import cli
from euro_lm.config import from_file
from euro_lm.inference import PROMPT_WIDTH_MULTIPLE
from euro_lm.model.decoder import Decoder
from euro_lm.sampling import left_pad, make_generate

_MODELS = flags.DEFINE_list(
    'models',
    ['configs/tiny.py', 'configs/llama_125m.py'],
    'Config files (path.py or path.py:variant).',
)
_BATCH = flags.DEFINE_integer('batch', 4, 'Prompts per batch.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Tokens per prompt.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'New tokens per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed runs per setting (the best counts).')
_FILE_PROMPTS = flags.DEFINE_integer(
    'file_prompts', 0, 'Also answer this many prompts of random lengths in batches; 0: skip.'
)


def bench(model_config, batch, prompt_len, new_tokens, repeats, use_cache):
  """(compile + first run seconds, best run seconds) of one generate call."""
  model = Decoder(model_config)
  params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))['params']))(
      jax.random.key(0)
  )
  tokens_BP = np.asarray(
      jax.random.randint(jax.random.key(1), (batch, prompt_len), 4, model_config.vocab_size),
      np.int32,
  )
  lengths_B = np.full((batch,), prompt_len, np.int32)
  run = make_generate(
      model, max_new_tokens=new_tokens, eos_id=-1, temperature=0.0, use_cache=use_cache
  )
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    out = run(params, tokens_BP, lengths_B, jax.random.key(0))
    out.tokens_BN.block_until_ready()
    times.append(time.perf_counter() - start)
  assert int(np.min(out.lengths_B)) == new_tokens  # no early stop distorts the rate
  return times[0], min(times[1:])


def bench_file(model_config, prompts, batch, prompt_len, new_tokens, multiple):
  """(seconds, distinct compiled shapes) to answer `prompts` random-length prompts
  `batch` at a time, each batch padded to a width that is a multiple of `multiple`."""
  model = Decoder(model_config)
  params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))['params']))(
      jax.random.key(0)
  )
  rng = np.random.default_rng(0)
  ids = [
      list(rng.integers(4, model_config.vocab_size, n))
      for n in rng.integers(1, 4 * prompt_len + 1, prompts)
  ]
  run = make_generate(model, max_new_tokens=new_tokens, eos_id=-1, temperature=0.0)
  shapes = set()
  start = time.perf_counter()
  for first in range(0, prompts, batch):
    tokens_BP, lengths_B = left_pad(ids[first : first + batch], 0, multiple)
    shapes.add(tokens_BP.shape)
    run(params, tokens_BP, lengths_B, jax.random.key(0)).tokens_BN.block_until_ready()
  return time.perf_counter() - start, len(shapes)


def main(argv):
  del argv
  batch, prompt_len, new_tokens = _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  print(
      f'{jax.device_count()} x {jax.devices()[0].device_kind}; batch {batch}, prompt '
      f'{prompt_len}, {new_tokens} new tokens, greedy, float32'
  )
  header = (
      f'{"model":<12} {"params":>8} {"cache tok/s":>12} {"recompute tok/s":>16} '
      f'{"speedup":>8} {"first runs s (cache/recomp)":>28}'
  )
  print(header)
  print('-' * len(header))
  for name in _MODELS.value:
    config = from_file(name).model
    name = os.path.splitext(os.path.basename(name))[0]
    results = [
        bench(config, batch, prompt_len, new_tokens, _REPEATS.value, use_cache)
        for use_cache in (True, False)
    ]
    (first_cache, best_cache), (first_full, best_full) = results
    rate_cache, rate_full = batch * new_tokens / best_cache, batch * new_tokens / best_full
    shapes = jax.eval_shape(Decoder(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    num_params = sum(x.size for x in jax.tree.leaves(shapes))
    print(
        f'{name:<12} {num_params / 1e6:>7.1f}M {rate_cache:>12.1f} {rate_full:>16.1f} '
        f'{rate_cache / rate_full:>7.1f}x {first_cache:>13.1f} / {first_full:<12.1f}',
        flush=True,
    )
  if _FILE_PROMPTS.value:
    _file_table(batch, prompt_len, new_tokens)


def _file_table(batch, prompt_len, new_tokens):
  prompts = _FILE_PROMPTS.value
  print(
      f'\n{prompts} prompts of 1 to {4 * prompt_len} tokens, {batch} at a time, {new_tokens} '
      'new tokens each, compiles included'
  )
  header = f'{"model":<12} {"widths":<16} {"shapes":>6} {"seconds":>8} {"tok/s":>8}'
  print(header)
  print('-' * len(header))
  for name in _MODELS.value:
    config = from_file(name).model
    name = os.path.splitext(os.path.basename(name))[0]
    rounded = f'multiple of {PROMPT_WIDTH_MULTIPLE}'
    for label, multiple in (('longest prompt', 1), (rounded, PROMPT_WIDTH_MULTIPLE)):
      seconds, shapes = bench_file(config, prompts, batch, prompt_len, new_tokens, multiple)
      rate = prompts * new_tokens / seconds
      print(f'{name:<12} {label:<16} {shapes:>6} {seconds:>8.1f} {rate:>8.1f}', flush=True)


if __name__ == '__main__':
  cli.run(main)
