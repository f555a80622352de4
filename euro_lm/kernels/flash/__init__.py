"""Flash attention in Pallas: the public API (`flash_attention`) and its tile tables."""

from euro_lm.kernels.flash.dispatch import (BACKENDS, BlockSizes, GPU_BLOCK_SIZES,
                                            HOPPER_MIN_LENGTH, TPU_BLOCK_SIZES, default_backend,
                                            flash_attention, gpu_block_sizes, length_multiple)
