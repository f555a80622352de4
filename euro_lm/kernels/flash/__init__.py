"""Flash attention in Pallas, one module per job: `dispatch` (the public API: which kernels
and tiles run, and the custom VJP), `blocks` (the contract the kernel sets share: block
ranges, visibility, tile sizes), and the kernel sets `triton` (GPUs; the interpreter on
CPU), `mosaic_tpu` (TPUs) and `mosaic_gpu` (Hopper GPUs)."""

from euro_lm.kernels.flash.blocks import BlockSizes
from euro_lm.kernels.flash.dispatch import (
    BACKENDS,
    GPU_BLOCK_SIZES,
    HOPPER_MIN_LENGTH,
    LSE_NAME,
    OUT_NAME,
    TPU_BLOCK_MULTIPLE,
    TPU_BLOCK_SIZES,
    default_backend,
    flash_attention,
    gpu_block_sizes,
    length_multiple,
    named_residuals,
    tpu_block_sizes,
)
