"""Packed training rows whose global order depends on (seed, step) alone.

The global batch has `num_streams` rows (one per sequence of the global batch). Row b of
every step comes from stream b, an independent packer with its own document sequence:

- the language of stream b's k-th document is drawn from the mixture weights of the step
  being filled, with a counter-based hash of (seed, b, k), so stages switch exactly at
  their step. Weights are shares of tokens: a language is drawn with probability
  proportional to its weight divided by its mean document length;
- stream b takes that language's documents at positions b, b + S, b + 2S, ... of the
  language's endless shuffled order (S = num_streams), so streams never share a document
  and together walk each language's epochs in order;
- documents are `[bos] + tokens + [eos]`, concatenated and split into `seq_len` rows with
  segment ids (1, 2, ... per piece; 0 is padding) and positions restarting per piece.
- with `masked=True` a document is a pair (ids, loss_mask) (a conversation, see
  euro_lm.data.chat) and rows also carry `loss_mask`: at input position k, the mask of the
  target token k + 1, so the loss counts exactly the tokens the mask marks. A conversation
  that does not fit the rest of a row starts the next one (the rest is padding, segment 0),
  so only one longer than a whole row is ever cut (make_data refuses those). Sources named
  `replay-<tag>` hold (ids, None): pretraining text replayed during fine-tuning, all in the
  loss and packed as documents are.

A process owns a contiguous block of streams and reads only their documents. The state is
a few integers per stream, so a checkpoint taken with P processes restores with any P'
that divides the number of streams: each process picks its streams out of the merged
states of all processes.

The state also records each language's key (which seeds its order) and document count, so
a run resumed with other languages continues every language it keeps exactly where it was,
starts an added one at its first document, and keeps a dropped one's position for later.
"""

import bisect
import json
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from euro_lm.errors import ConfigError

_MASK64 = (1 << 64) - 1
# Sources of a masked stream named with this prefix are replayed pretraining text: whole
# documents in the loss, cut at row ends like any document.
REPLAY_PREFIX = 'replay-'


def stream_name(source: str, language: str) -> str:
  """The stream of a named conversation source's language, `<source>/<language>`; the
  language alone for the one unnamed source (and for pretraining text)."""
  return f'{source}/{language}' if source else language


def stream_source(stream: str) -> str:
  """The conversation source a stream belongs to ('' unnamed, or replayed text)."""
  return stream.rpartition('/')[0]


def stream_language(stream: str) -> str:
  """The language tag of a stream, without its source and replay prefix."""
  return stream.rpartition('/')[2].removeprefix(REPLAY_PREFIX)


def _hash(a, b, c):
  """64 well-mixed bits from three integers (splitmix64 over the packed key)."""
  z = (
      a * 0x9E3779B97F4A7C15 + b * 0xBF58476D1CE4E5B9 + c * 0x94D049BB133111EB + 0x2545F4914F6CDD1D
  ) & _MASK64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  return z ^ (z >> 31)


def _uniform(seed, stream, index):
  """A float in [0, 1) from (seed, stream, index)."""
  return (_hash(seed, stream, index) >> 11) / float(1 << 53)


def shuffled_index(key, size, index):
  """Position `index` of a pseudo-random permutation of range(size) chosen by `key`.

  A 4-round Feistel network over the smallest even-bit domain >= size, walking cycles
  until the result falls inside range(size): O(1) time and memory per lookup, so a
  language's order costs nothing to hold however many documents it has.
  """
  half_bits = max(1, ((size - 1).bit_length() + 1) // 2)
  mask = (1 << half_bits) - 1
  x = index
  while True:
    left, right = x >> half_bits, x & mask
    for round_ in range(4):
      left, right = right, left ^ (_hash(key, round_, right) & mask)
    x = (left << half_bits) | right
    if x < size:
      return x


def _shares(weights):
  total = sum(w for w in weights.values() if w > 0)
  return ', '.join(f'{l}={w / total:.3g}' for l, w in sorted(weights.items()) if w > 0)


def _same_shares(a, b):
  total_a = sum(w for w in a.values() if w > 0)
  total_b = sum(w for w in b.values() if w > 0)
  return set(l for l, w in a.items() if w > 0) == set(l for l, w in b.items() if w > 0) and all(
      math.isclose(a[l] / total_a, b[l] / total_b, rel_tol=1e-9) for l in a if a[l] > 0
  )


def process_streams(num_streams, process_index, process_count):
  """The contiguous block of stream ids that `process_index` owns."""
  if num_streams % process_count:
    raise ValueError(f'{num_streams} streams cannot be split over {process_count} processes')
  per_process = num_streams // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def consumption(states: Sequence[bytes]) -> dict[str, dict]:
  """What a run drew up to a saved step, from the data states of all its processes (a
  checkpoint's `data` item): language -> `tokens` put in rows, `documents` begun (a
  document cut at a row end counts once) and `training_documents` (None where the state
  predates recording them). Exact whatever the process count and resumes before."""
  loaded = [json.loads(s) for s in states]
  streams = {b: v for s in loaded for b, v in s['streams'].items()}
  saved = {**(loaded[0].get('languages') or {})} if loaded else {}
  result = {}
  for stream in streams.values():
    for language in set(stream['tokens']) | set(stream['taken']):
      entry = result.setdefault(language, {'tokens': 0, 'documents': 0})
      entry['tokens'] += stream['tokens'].get(language, 0)
      entry['documents'] += stream['taken'].get(language, 0)
  for language, entry in result.items():
    entry['training_documents'] = saved.get(language, {}).get('documents')
  return dict(sorted(result.items()))


class PackedStreams:
  """Iterator over this process's rows of each global batch.

  Args:
    sources: language tag -> random-access documents (a `grain.MapDataset` or sequence)
      of int32 token ids without BOS/EOS.
    weights_at: step -> {language tag: weight}, the share of tokens each language should
      get; languages missing or at 0 are not drawn.
    mean_document_tokens: language tag -> mean tokens per document (without BOS/EOS).
    seq_len: tokens per row.
    num_streams: rows in the global batch.
    streams: the stream ids this process produces (see `process_streams`).
    seed: the data seed.
    bos_id, eos_id: added around every document (None leaves that end bare).
    masked: documents are (ids, loss_mask) pairs; rows get `loss_mask` (see above).

  Rows are always full (sources repeat endlessly), so training rows of documents hold no
  padding; rows of conversations end in padding where the next one does not fit.
  """

  def __init__(
      self,
      sources: Mapping[str, Sequence],
      weights_at: Callable[[int], dict],
      *,
      mean_document_tokens: Mapping[str, float],
      seq_len: int,
      num_streams: int,
      streams: Sequence[int],
      seed: int,
      bos_id: int | None,
      eos_id: int | None,
      masked: bool = False,
  ):
    self._languages = sorted(sources)
    for language in self._languages:
      if not len(sources[language]):
        raise ValueError(f'language {language} has no documents')
    self._sources = dict(sources)
    extra = (bos_id is not None) + (eos_id is not None)
    # Tokens a drawn document adds to rows, on average (its inputs: length + extra - 1).
    self._document_cost = {
        l: max(mean_document_tokens[l] + extra - 1, 1.0) for l in self._languages
    }
    self._weights_at = weights_at
    self._seq_len, self._num_streams, self._seed = seq_len, num_streams, seed
    self._streams = list(streams)
    self._bos, self._eos = bos_id, eos_id
    self._masked = masked
    # A language's key seeds its document order; a fresh run numbers them in sorted order.
    self._keys = {language: key for key, language in enumerate(self._languages)}
    self._dropped = {}  # languages a resumed run left out: their saved keys and sizes
    self._step = 0
    self._state = {b: self._fresh_stream() for b in self._streams}
    self._cumulative_for = (None, None, None)

  def _fresh_stream(self):
    return {'documents': 0, 'taken': {}, 'carry': None, 'tokens': {}, 'pieces': 0, 'continued': 0}

  def __iter__(self):
    return self

  def __next__(self):
    rows = [self._fill_row(b) for b in self._streams]
    self._step += 1
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

  # --- state -----------------------------------------------------------------------

  def get_state(self) -> bytes:
    languages = {
        language: {'key': self._keys[language], 'documents': len(self._sources[language])}
        for language in self._languages
    }
    return json.dumps(
        {
            'step': self._step,
            'streams': {str(b): self._state[b] for b in self._streams},
            'languages': {**self._dropped, **languages},
            'weights': {l: float(w) for l, w in self._weights_at(self._step).items()},
        }
    ).encode()

  def set_state(self, state: bytes | Sequence[bytes]):
    """Restores from one state or from the states of all processes of a saving run.

    The languages may differ from the saving run's (see `_resume_languages`); the mixture
    weights may too: they are a function of the step, recomputed from this run's config.
    """
    states = [json.loads(s) for s in ([state] if isinstance(state, (bytes, str)) else state)]
    merged, steps = {}, set()
    for s in states:
      steps.add(s['step'])
      merged.update({int(b): v for b, v in s['streams'].items()})
    if len(steps) != 1:
      raise ValueError(f'data states from different steps: {sorted(steps)}')
    missing = [b for b in self._streams if b not in merged]
    if missing:
      raise ConfigError(
          f'the saved data state has no stream {missing[0]}: was it saved with '
          'a different global batch size (train.global_batch_size)?'
      )
    step = steps.pop()
    streams = {b: merged[b] for b in self._streams}
    notes = self._resume_languages(step, states[0].get('languages'), streams)
    saved_weights = states[0].get('weights')
    if saved_weights is not None and not _same_shares(saved_weights, self._weights_at(step)):
      notes.append(
          f"the mixture weights at step {step} differ from the saved run's "
          f'({_shares(saved_weights)} -> {_shares(self._weights_at(step))})'
      )
    if notes and self._streams and self._streams[0] == 0:  # one process says it
      print(f'data: resuming step {step} with a changed mixture: ' + '; '.join(notes))
    self._step, self._state = step, streams
    self._cumulative_for = (None, None, None)

  def _resume_languages(self, step, saved, streams):
    """Takes the saved languages' keys; returns notes on what changed. A kept language
    continues where it was, an added one starts at its first document, a dropped one's
    state stays in the checkpoint (a document it was in the middle of is left)."""
    if saved is None:  # saved before languages were recorded: the keys were sorted order
      named = {l for st in streams.values() for l in st['taken']}
      unknown = sorted(named - set(self._languages))
      if unknown:
        raise ConfigError(
            f'the data state of step {step} predates resuming with other languages and '
            f'draws from {", ".join(unknown)}, which this run does not have: resume with '
            'its data.languages first'
        )
      return []
    resized = [
        f'{l} ({saved[l]["documents"]} then, {len(self._sources[l])} now)'
        for l in self._languages
        if l in saved and saved[l]['documents'] != len(self._sources[l])
    ]
    if resized:
      raise ConfigError(
          f'the training documents of {", ".join(resized)} changed since step {step} was '
          'saved, so its position there means other documents; resume with the same data '
          '(data.valid_fraction, data.prepared_dir), or start a new run from the parameters '
          'with train.init_from'
      )
    kept = [l for l in self._languages if l in saved]
    added = [l for l in self._languages if l not in saved]
    dropped = sorted(set(saved) - set(self._languages))
    next_key = max((v['key'] for v in saved.values()), default=-1) + 1
    self._keys = {l: saved[l]['key'] for l in kept}
    self._keys.update({l: next_key + i for i, l in enumerate(added)})
    self._dropped = {l: saved[l] for l in dropped}
    if not added and not dropped:
      return []
    cut = 0
    for stream in streams.values():
      if stream['carry'] is not None and stream['carry'][0] in self._dropped:
        stream['carry'], cut = None, cut + 1
    notes = [
        f'kept {", ".join(kept) or "none"}',
        f'added {", ".join(added) or "none"} (from their first document)',
        f'dropped {", ".join(dropped) or "none"} (their positions are kept for a later run)',
    ]
    if cut:
      notes.append(f'{cut} rows leave the rest of a document of a dropped language')
    return notes

  @property
  def step(self):
    return self._step

  def tokens_by_language(self):
    """Tokens this process has put in rows so far, per language."""
    totals = {}
    for stream in self._state.values():
      for language, n in stream['tokens'].items():
        totals[language] = totals.get(language, 0) + n
    return totals

  def packing_stats(self):
    """Document rows hold no padding (concatenate-then-split), so the cost of packing is
    documents cut at row ends: `continued_fraction` is the share of row pieces that continue
    a document begun in the previous row. Conversations (masked) are never cut, so their
    cost is `padding_fraction`, the share of row tokens left as padding."""
    pieces = sum(s['pieces'] for s in self._state.values())
    continued = sum(s['continued'] for s in self._state.values())
    padded = sum(s.get('padded', 0) for s in self._state.values())
    rows = self._step * len(self._streams) * self._seq_len
    return {
        'padding_fraction': padded / max(rows, 1),
        'continued_fraction': continued / max(pieces, 1),
    }

  # --- packing ---------------------------------------------------------------------

  def _cumulative_weights(self):
    """(languages, cumulative probabilities) for the current step, cached per step."""
    step, languages, cumulative = self._cumulative_for
    if step == self._step:
      return languages, cumulative
    weights = self._weights_at(self._step)
    languages = [l for l in self._languages if weights.get(l, 0) > 0]
    unknown = sorted(set(l for l, w in weights.items() if w > 0) - set(self._languages))
    if unknown:
      raise ValueError(
          f'mixture weights at step {self._step} name languages without data: {", ".join(unknown)}'
      )
    if not languages:
      raise ValueError(f'mixture weights at step {self._step} give no language a positive weight')
    draws = [weights[l] / self._document_cost[l] for l in languages]
    cumulative = np.cumsum(draws) / sum(draws)
    self._cumulative_for = (self._step, languages, list(cumulative))
    return languages, self._cumulative_for[2]

  def document_at(self, language, index):
    """Document `index` of the language's endless order: epoch e = index // n is the
    e-th pseudo-random permutation of its n documents."""
    source = self._sources[language]
    epoch, position = divmod(index, len(source))
    key = _hash(self._seed, self._keys[language], epoch)
    return source[shuffled_index(key, len(source), position)]

  def _document(self, language, index):
    """(token ids with BOS/EOS, loss mask or None when unmasked); markers count. A masked
    stream's document with mask None (replayed text) counts whole and may be cut."""
    document = self.document_at(language, index)
    tokens, mask = document if self._masked else (document, None)
    if self._masked and mask is None:
      mask = np.ones(len(tokens), np.int32)
    parts = (
        ([[self._bos]] if self._bos is not None else [])
        + [np.asarray(tokens, np.int32)]
        + ([[self._eos]] if self._eos is not None else [])
    )
    ids = np.concatenate(parts).astype(np.int32)
    if mask is not None:
      ones = [[1]] if self._bos is not None else []
      tail = [[1]] if self._eos is not None else []
      mask = np.concatenate([*ones, np.asarray(mask, np.int32), *tail]).astype(np.int32)
    return ids, mask

  def _next_document(self, b, stream):
    languages, cumulative = self._cumulative_weights()
    u = _uniform(self._seed, b, stream['documents'])
    language = languages[min(bisect.bisect_right(cumulative, u), len(languages) - 1)]
    taken = stream['taken'].get(language, 0)
    stream['taken'][language] = taken + 1
    stream['documents'] += 1
    return [language, taken * self._num_streams + b, 0]

  def _fill_row(self, b):
    stream = self._state[b]
    length = self._seq_len
    inputs = np.zeros(length, np.int32)
    targets = np.zeros(length, np.int32)
    segment_ids = np.zeros(length, np.int32)
    positions = np.zeros(length, np.int32)
    loss_mask = np.zeros(length, np.int32)
    filled, segment = 0, 0
    while filled < length:
      if stream['carry'] is None:
        stream['carry'] = self._next_document(b, stream)
      language, index, offset = stream['carry']
      document, mask = self._document(language, index)
      whole = self._masked and not language.startswith(REPLAY_PREFIX)
      usable = len(document) - 1  # inputs are document[:-1], targets document[1:]
      take = min(usable - offset, length - filled)
      if take <= 0:  # a document too short to have a target (no BOS/EOS, <2 tokens)
        stream['carry'] = None
        continue
      if whole and filled and take < usable - offset:
        # A conversation is never cut: its answer would lose its prompt. The row ends in
        # padding and the conversation opens the next one.
        stream['padded'] = stream.get('padded', 0) + length - filled
        break
      segment += 1
      stream['pieces'] += 1
      stream['continued'] += offset > 0
      end = filled + take
      inputs[filled:end] = document[offset : offset + take]
      targets[filled:end] = document[offset + 1 : offset + take + 1]
      segment_ids[filled:end] = segment
      positions[filled:end] = np.arange(take)
      if mask is not None:
        loss_mask[filled:end] = mask[offset + 1 : offset + take + 1]
      stream['tokens'][language] = stream['tokens'].get(language, 0) + take
      filled = end
      offset += take
      stream['carry'] = None if offset == usable else [language, index, offset]
    row = {
        'inputs': inputs,
        'targets': targets,
        'segment_ids': segment_ids,
        'positions': positions,
    }
    if self._masked:
      row['loss_mask'] = loss_mask
    return row
