"""Every euro_lm config field with its default (`euro_lm.config.base_config`).

Use: `python -m euro_lm.train --config=configs/base.py --config.train.steps=100`.
"""

from euro_lm.config import base_config, check_variant

VARIANTS = ()


def get_config(arg=None):
  check_variant(arg, VARIANTS, __file__)
  return base_config()
