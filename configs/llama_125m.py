"""~124M-parameter Llama-style model (GPT-3 Small shape: 12 x 768, 12 heads). Variants: `:bf16`."""

from euro_lm.config import base_config, check_variant

VARIANTS = ('bf16',)


def get_config(arg=None):
  arg = check_variant(arg, VARIANTS, __file__)
  c = base_config()
  c.model.vocab_size = 32_000
  c.model.num_layers = 12
  c.model.embed_dim = 768
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.head_dim = 64
  c.model.mlp_dim = 2560
  c.train.global_batch_size = 256
  c.train.seq_len = 2048
  c.optimizer.learning_rate = 6e-4
  c.optimizer.warmup_steps = 1000
  c.train.steps = 50_000
  if arg == 'bf16':
    c.model.compute_dtype = 'bfloat16'
  return c
