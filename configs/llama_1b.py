"""~1.2B-parameter Llama-style model, 4k context: Llama-3.2-1B's shape and RoPE (its
`llama3` scaling) with a 64k vocabulary. `--config.model.vocab_size=128256` makes it
Llama-3.2-1B itself, so its imported parameters continue training with these settings.

Variants: `:gpu` (bfloat16, `auto` attention, remat of matmul outputs). `auto` takes what
ran fastest on each device (`euro_lm.model.attention.resolve`; BENCHMARKS.md).
"""

from euro_lm.config import base_config, check_variant

VARIANTS = ('gpu',)


def get_config(arg=None):
  arg = check_variant(arg, VARIANTS, __file__)
  c = base_config()
  c.model.vocab_size = 65_536
  c.model.num_layers = 16
  c.model.embed_dim = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 8192
  c.model.rope_theta = 500_000.0
  c.model.rope_scaling = 'llama3'
  c.model.rope_scaling_factor = 32.0
  c.model.rope_low_freq_factor = 1.0
  c.model.rope_high_freq_factor = 4.0
  c.model.rope_original_max_positions = 8192
  c.train.global_batch_size = 512
  c.train.seq_len = 4096
  c.train.steps = 100_000
  c.optimizer.schedule = 'wsd'
  c.optimizer.warmup_steps = 2000
  if arg == 'gpu':
    c.model.compute_dtype = 'bfloat16'
    c.model.attention_impl = 'auto'
    c.model.remat_policy = 'dots_no_batch'
  return c
