"""Pallas attention kernels."""

from euro_lm.kernels.flash import (
    BACKENDS,
    GPU_BLOCK_SIZES,
    HOPPER_MIN_LENGTH,
    LSE_NAME,
    OUT_NAME,
    TPU_BLOCK_MULTIPLE,
    TPU_BLOCK_SIZES,
    BlockSizes,
    default_backend,
    flash_attention,
    gpu_block_sizes,
    length_multiple,
    named_residuals,
    tpu_block_sizes,
)
