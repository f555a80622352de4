"""The euro_lm model: a functional Flax Llama-family decoder.

Arrays carry their shape in their names (`x_BLD`, `logits_BLV`, `wq_DHd`), one letter per
axis, the same letter for the same axis everywhere in euro_lm:

  B batch          L length (sequence)     S KV-cache slots      T tokens in a decode call
  D model (embed) width                    d head width (head_dim)
  H query heads    K key/value heads       G query heads per key/value head (H / K)
  F MLP hidden width                       V vocabulary
  Q, M a chunk's queries and keys          C loss chunk length
  P prompt length (generation)             I, O a projection's flattened input/output width
  N a count the function names: layers, chunks, new tokens, flattened rows
"""

from euro_lm.model.attention import attention
from euro_lm.model.decoder import REMAT_POLICIES, Decoder
from euro_lm.model.flops import forward_flops_per_token, param_count, train_flops_per_token
