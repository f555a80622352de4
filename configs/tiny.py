"""CPU demo: a 4M-parameter model on the embedded multilingual corpus (the README's main job).

Trains in a few minutes on 2 CPU cores with a clearly falling per-language validation loss.
"""

from euro_lm.config import base_config, check_variant

VARIANTS = ()


def get_config(arg=None):
  check_variant(arg, VARIANTS, __file__)
  c = base_config()
  c.model.vocab_size = 4096
  c.model.num_layers = 4
  c.model.embed_dim = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 64
  c.model.mlp_dim = 704
  c.train.steps = 600
  c.train.global_batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.eval_batches = 2
  c.train.checkpoint_every = 200
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.0
  return c
