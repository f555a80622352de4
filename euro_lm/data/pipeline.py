"""Grain pipelines: documents -> tokens -> packed rows -> per-process batches.

Every batch is a dict of int32 arrays of shape [batch, seq_len]:
  inputs       token ids fed to the model;
  targets      the next token of each input (inputs shifted left by one);
  segment_ids  1, 2, ... per document within the row, 0 for padding;
  positions    position of each token within its document piece, from 0.
A document is `[bos] + encode(doc) + [eos]`, packed back to back
(concatenate-then-split): a document that does not fit a row continues in the
next one, where its segment starts again at position 0. Attention must not
cross segments, and the loss weights are `segment_ids != 0`: the train loop
computes them, the pipeline does not ship them.
"""

from collections.abc import Sequence
import itertools

import grain
import numpy as np

from euro_lm.data.tokenizer import Tokenizer

FEATURES = ('inputs', 'targets', 'segment_ids', 'positions')


def _check_process(process_index: int, process_count: int):
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} must be in [0, {process_count}).'
    )


def _tokenize_fn(tokenizer: Tokenizer):
  bos, eos = tokenizer.bos_id, tokenizer.eos_id

  def tokenize(doc: str) -> dict[str, np.ndarray]:
    tokens = np.asarray([bos, *tokenizer.encode(doc), eos], np.int32)
    return {'inputs': tokens[:-1], 'targets': tokens[1:]}

  return tokenize


class _JsonStateIterator(grain.DatasetIterator):
  """Restores ConcatThenSplit state that went through JSON.

  grain 0.2.18 tells "no remainder" by comparing the state's slices with the
  tuple (-1, -1). JSON, which grain's checkpoint handlers write, turns them
  into lists, and a state saved at a document boundary then restores wrong.
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state({**state, 'remainder_slices': slices})


class _JsonState(grain.IterDataset):

  def __iter__(self):
    return _JsonStateIterator(self._parent.__iter__())


def _pack(
    examples: grain.IterDataset, seq_len: int, pad_id: int
) -> grain.IterDataset:
  """Concatenates examples and splits them into rows of `seq_len` tokens."""
  # inputs and targets of an example have equal lengths, so both features
  # split at the same points and share segment ids and positions.
  packed = _JsonState(
      grain.experimental.ConcatThenSplitIterDataset(
          examples, length_struct={'inputs': seq_len, 'targets': seq_len}
      )
  )

  def to_row(packed_row):
    padding = packed_row['inputs_segment_ids'] == 0
    return {
        'inputs': np.where(padding, pad_id, packed_row['inputs']),
        'targets': np.where(padding, pad_id, packed_row['targets']),
        'segment_ids': packed_row['inputs_segment_ids'],
        'positions': packed_row['inputs_positions'],
    }

  return packed.map(to_row)


def _padding_id(tokenizer: Tokenizer) -> int:
  # Padding is masked by segment id 0, so any valid id works when a loaded
  # model has no pad piece.
  return max(tokenizer.pad_id, 0)


def train_documents(
    docs: Sequence[str],
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
  """This process's endless stream of training documents.

  The global stream is the documents shuffled by `seed`, reshuffled every
  epoch; process p takes its elements p, p + process_count, ... So shards are
  disjoint, together cover every document, and the global order does not
  depend on the number of processes.
  """
  _check_process(process_index, process_count)
  if not docs:
    raise ValueError('No training documents.')
  # shuffle before repeat: grain reseeds the shuffle for each epoch.
  stream = grain.MapDataset.source(docs).shuffle(seed=seed).repeat()
  return stream[process_index::process_count]


def make_train_dataset(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
  """Endless packed training batches of [batch_size, seq_len] for this process.

  `batch_size` is per process. The iterator's `get_state()` / `set_state()`
  restore the exact position in the stream.
  """
  examples = (
      train_documents(
          docs,
          seed=seed,
          process_index=process_index,
          process_count=process_count,
      )
      .map(_tokenize_fn(tokenizer))
      .to_iter_dataset()
  )
  rows = _pack(examples, seq_len, _padding_id(tokenizer))
  return rows.batch(batch_size, drop_remainder=True)


def make_eval_batches(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
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
  examples = (
      grain.MapDataset.source(docs)
      .map(_tokenize_fn(tokenizer))
      .to_iter_dataset()
  )
  rows_per_step = batch_size * process_count
  rows = list(
      itertools.islice(
          _pack(examples, seq_len, pad_id), max_batches * rows_per_step or None
      )
  )
  num_batches = -(-len(rows) // rows_per_step)
  padding_row = {
      'inputs': np.full(seq_len, pad_id, np.int32),
      'targets': np.full(seq_len, pad_id, np.int32),
      'segment_ids': np.zeros(seq_len, np.int32),
      'positions': np.zeros(seq_len, np.int32),
  }
  rows += [padding_row] * (num_batches * rows_per_step - len(rows))
  own_rows = rows[process_index::process_count]
  token_bytes = tokenizer.token_bytes()
  batches = []
  for start in range(0, len(own_rows), batch_size):
    batch = {
        name: np.stack(
            [row[name] for row in own_rows[start : start + batch_size]]
        )
        for name in FEATURES
    }
    batch['target_bytes'] = np.where(
        batch['segment_ids'] != 0, token_bytes[batch['targets']], 0
    ).astype(np.int32)
    batches.append(batch)
  return batches
