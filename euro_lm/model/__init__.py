"""The euro_lm model: a functional Flax Llama-family decoder."""

from euro_lm.model.attention import attention
from euro_lm.model.decoder import Decoder, REMAT_POLICIES
from euro_lm.model.flops import forward_flops_per_token, param_count, train_flops_per_token
