"""Pallas attention kernels."""

from euro_lm.kernels.flash_attention import (BlockSizes, GPU_BLOCK_SIZES, TPU_BLOCK_SIZES,
                                             flash_attention, length_multiple)
