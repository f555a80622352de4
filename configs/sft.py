"""Supervised fine-tuning on conversations, from an imported model or a run's checkpoint.

Use: `python -m euro_lm.train --config=configs/sft.py --workdir=DIR
--config.train.init_from=SRC --config.data.chat_files='convs/*.jsonl'`. The model's
architecture comes from SRC's config (`train.model_from_init`); `:lora` trains rank-16
adapters on every projection instead of all weights.
"""

from euro_lm.config import base_config, check_variant

VARIANTS = ('lora',)


def get_config(arg=None):
  variant = check_variant(arg, VARIANTS, __file__)
  c = base_config()
  c.train.model_from_init = True
  c.train.steps = 1000
  c.train.global_batch_size = 32
  c.train.seq_len = 2048
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 200
  c.data.valid_fraction = 0.05
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.0
  if variant == 'lora':
    c.model.lora_rank = 16
    c.optimizer.learning_rate = 2e-4
  return c
