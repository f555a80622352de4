"""Pallas attention kernels."""

from euro_lm.kernels.flash_attention import (BACKENDS, BlockSizes, GPU_BLOCK_SIZES,
                                             TPU_BLOCK_SIZES, default_backend, flash_attention,
                                             length_multiple)
