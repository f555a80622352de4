"""~1.2B-parameter Llama-style model (Llama-3.2-1B shape with a 64k vocabulary), 4k context.

Variants: `:gpu` (bfloat16, `auto` attention, remat of matmul outputs). `auto` takes what
ran fastest on each device (`euro_lm.model.attention.resolve`; BENCHMARKS.md).
"""

from euro_lm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model.vocab_size = 65_536
  c.model.num_layers = 16
  c.model.embed_dim = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 8192
  c.model.rope_theta = 500_000.0
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
