"""Analytic FLOP and parameter counts for MFU (model FLOPs: remat recompute not counted)."""

import math

from euro_lm.model import lora
from euro_lm.model.layers import XIELU_SCALARS, head_dim, local_layers


def param_count(model_config):
  """Number of parameters, embeddings (and LoRA adapters) included."""
  c = model_config
  hd = head_dim(c)
  attention = c.embed_dim * hd * (2 * c.num_heads + 2 * c.num_kv_heads)
  if lora.has_gate(c):
    mlp = 3 * c.embed_dim * c.mlp_dim
  else:  # up, down and xIELU's scalars
    mlp = 2 * c.embed_dim * c.mlp_dim + sum(math.prod(s) for _, s in XIELU_SCALARS.values())
  norms = (4 if c.get('post_norms', False) else 2) * c.embed_dim + (2 * hd if c.qk_norm else 0)
  biases = hd * (c.num_heads + 2 * c.num_kv_heads) if c.get('qkv_bias', False) else 0
  embeddings = c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)
  layers = c.num_layers * (attention + mlp + norms + biases)
  return layers + embeddings + c.embed_dim + lora.adapter_count(c)


def _forward_parts(c, seq_len, causal_half=True):
  """Forward FLOPs per token: (weight matmuls incl. the output logits, attention, adapters).
  `causal_half=False`: every query against every key (of its window), PaLM's convention."""
  hd = head_dim(c)
  projections = c.embed_dim * hd * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = (3 if lora.has_gate(c) else 2) * c.embed_dim * c.mlp_dim
  window = c.get('sliding_window', 0)
  attention = 0
  for local in local_layers(c):
    keys = seq_len / 2 if causal_half else seq_len
    if local and 0 < window < seq_len:
      keys = window - window**2 / (2 * seq_len) if causal_half else window
    attention += 4 * c.num_heads * hd * keys  # QK^T and PV
  weights = c.num_layers * 2 * (projections + mlp) + 2 * c.embed_dim * c.vocab_size
  return weights, round(attention), 2 * lora.adapter_count(c)


def forward_flops_per_token(model_config, seq_len):
  """Forward matmul + attention FLOPs per token (2 per multiply-add).

  Counts every projection (q, k, v, o, gate where there is one, up, down, output logits,
  LoRA adapters) and the two attention matmuls (QK^T and PV), halved for the causal mask
  (the FlashAttention and MaxText convention; PaLM and TorchTitan count attention in full,
  which gives a higher MFU for the same run). A layer with a sliding window W < L counts
  the keys its queries see on average, W - W^2 / (2L) (which is L / 2 at W = L).
  Embedding lookups, norms, RoPE and softmax are not matmuls and are left out.
  """
  return sum(_forward_parts(model_config, seq_len))


def train_flops_per_token(model_config, seq_len, causal_half=True):
  """Forward plus backward: twice the forward; with LoRA, the frozen weights' gradients
  are not computed, so their matmuls count twice (forward, input gradient), not three times.
  `causal_half=False` counts attention in full (PaLM, TorchTitan), for comparison only."""
  weights, attention, adapters = _forward_parts(model_config, seq_len, causal_half)
  return (2 if lora.targets(model_config) else 3) * weights + 3 * (attention + adapters)
