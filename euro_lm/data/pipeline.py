"""Validation batches: documents -> tokens -> packed rows -> per-process batches.

Training rows come from euro_lm.data.streams; this module packs held-out text the same
way, in one deterministic pass.

Every batch is a dict of int32 arrays of shape [batch, seq_len]:
  inputs       token ids fed to the model;
  targets      the next token of each input (inputs shifted left by one);
  segment_ids  1, 2, ... per document within the row, 0 for padding;
  positions    position of each token within its document piece, from 0.
A document is `[bos] + encode(doc) + [eos]` (either end as `add_bos`/`add_eos` say),
packed back to back
(concatenate-then-split): a document that does not fit a row continues in the
next one, where its segment starts again at position 0. Attention must not
cross segments, and the loss weights are `segment_ids != 0`: the train loop
computes them, the pipeline does not ship them. Conversations, (ids, loss_mask) pairs,
also give `loss_mask` (the mask of each target), which the weights multiply.
"""

import itertools
from collections.abc import Sequence

import grain
import numpy as np

from euro_lm.data.tokenizer import Tokenizer

FEATURES = ('inputs', 'targets', 'segment_ids', 'positions')
LOSS_MASK = 'loss_mask'  # the train step's name for it too (euro_lm.train.step)


def _check_process(process_index: int, process_count: int):
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count}).')


def _tokenize_fn(tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
  bos = [tokenizer.bos_id] if add_bos else []
  eos = [tokenizer.eos_id] if add_eos else []

  def tokenize(doc) -> dict[str, np.ndarray]:
    if isinstance(doc, tuple):  # a conversation: its template wrote any markers
      ids, mask = (np.asarray(x, np.int32) for x in doc)
      return {'inputs': ids[:-1], 'targets': ids[1:], LOSS_MASK: mask[1:]}
    ids = tokenizer.encode(doc) if isinstance(doc, str) else doc  # text or token ids
    tokens = np.asarray([*bos, *ids, *eos], np.int32)
    return {'inputs': tokens[:-1], 'targets': tokens[1:]}

  return tokenize


def _pack(
    examples: grain.IterDataset, seq_len: int, pad_id: int, masked: bool
) -> grain.IterDataset:
  """Concatenates examples and splits them into rows of `seq_len` tokens."""
  # inputs and targets (and loss_mask) of an example have equal lengths, so all
  # features split at the same points and share segment ids and positions.
  features = ('inputs', 'targets', LOSS_MASK) if masked else ('inputs', 'targets')
  packed = grain.experimental.ConcatThenSplitIterDataset(
      examples, length_struct={name: seq_len for name in features}
  )

  def to_row(packed_row):
    padding = packed_row['inputs_segment_ids'] == 0
    row = {
        'inputs': np.where(padding, pad_id, packed_row['inputs']),
        'targets': np.where(padding, pad_id, packed_row['targets']),
        'segment_ids': packed_row['inputs_segment_ids'],
        'positions': packed_row['inputs_positions'],
    }
    if masked:
      row[LOSS_MASK] = np.where(padding, 0, packed_row[LOSS_MASK]).astype(np.int32)
    return row

  return packed.map(to_row)


def _padding_id(tokenizer: Tokenizer) -> int:
  # Padding is masked by segment id 0, so any valid id works when a loaded
  # model has no pad piece.
  return max(tokenizer.pad_id, 0)


def make_eval_batches(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    add_bos: bool = True,
    add_eos: bool = True,
) -> list[dict[str, np.ndarray]]:
  """One deterministic pass over `docs`, packed into this process's batches.

  All documents are packed into rows in order; row r goes to process
  r % process_count. Rows are padded (segment id 0, pad id) up to a whole
  number of global batches, so every process gets the same number of
  [batch_size, seq_len] batches, as collective eval steps need. At most
  `max_batches` batches per process; 0 means all.

  Each batch also carries `target_bytes`: the UTF-8 bytes each target token
  decodes to (0 at padding), for bits per byte.
  """
  _check_process(process_index, process_count)
  pad_id = _padding_id(tokenizer)
  tokenize = _tokenize_fn(tokenizer, add_bos, add_eos)
  examples = grain.MapDataset.source(docs).map(tokenize).to_iter_dataset()
  masked = bool(len(docs)) and isinstance(docs[0], tuple)
  features = (*FEATURES, LOSS_MASK) if masked else FEATURES
  rows_per_step = batch_size * process_count
  rows = list(
      itertools.islice(
          _pack(examples, seq_len, pad_id, masked), max_batches * rows_per_step or None
      )
  )
  num_batches = -(-len(rows) // rows_per_step)
  padding_row = {
      'inputs': np.full(seq_len, pad_id, np.int32),
      'targets': np.full(seq_len, pad_id, np.int32),
      'segment_ids': np.zeros(seq_len, np.int32),
      'positions': np.zeros(seq_len, np.int32),
  }
  if masked:
    padding_row[LOSS_MASK] = np.zeros(seq_len, np.int32)
  rows += [padding_row] * (num_batches * rows_per_step - len(rows))
  own_rows = rows[process_index::process_count]
  token_bytes = tokenizer.token_bytes()
  batches = []
  for start in range(0, len(own_rows), batch_size):
    batch = {
        name: np.stack([row[name] for row in own_rows[start : start + batch_size]])
        for name in features
    }
    counted = batch['segment_ids'] != 0
    if masked:
      counted &= batch[LOSS_MASK] != 0
    batch['target_bytes'] = np.where(counted, token_bytes[batch['targets']], 0).astype(np.int32)
    batches.append(batch)
  return batches
