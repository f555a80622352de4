"""~7B-parameter Llama-style model (Llama-2-7B shape with GQA and a 64k vocabulary).

Variants: `:gpu` (bfloat16, `auto` attention as in llama_1b, full remat, FSDP over all
devices).
"""

from euro_lm.config import base_config, check_variant

VARIANTS = ('gpu',)


def get_config(arg=None):
  arg = check_variant(arg, VARIANTS, __file__)
  c = base_config()
  c.model.vocab_size = 65_536
  c.model.num_layers = 32
  c.model.embed_dim = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 11_008
  c.model.tie_embeddings = False
  c.model.rope_theta = 500_000.0
  c.train.global_batch_size = 1024
  c.train.seq_len = 4096
  c.train.steps = 250_000
  c.optimizer.schedule = 'wsd'
  c.optimizer.warmup_steps = 2000
  if arg == 'gpu':
    c.model.compute_dtype = 'bfloat16'
    c.model.attention_impl = 'auto'
    c.model.remat_policy = 'full'
    c.mesh.data = 1
    c.mesh.fsdp = -1
  return c
