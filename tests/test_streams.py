"""Packed streams: global batches depend on (seed, step) alone, for any process count."""

import json

import numpy as np
import pytest

from euro_lm.data.streams import PackedStreams, process_streams, shuffled_index
from euro_lm.errors import ConfigError

BOS, EOS = 1, 2
LANGUAGES = ('aaa_Latn', 'bbb_Latn', 'ccc_Latn')


def make_sources(seed=0):
  """Documents whose tokens name them: language l, document d -> 1000*(l+1) + 10*d + i%10."""
  rng = np.random.default_rng(seed)
  sources = {}
  for l, language in enumerate(LANGUAGES):
    sizes = rng.integers(1, 40, size=(20, 35, 50)[l])
    sources[language] = [
        np.array([1000 * (l + 1) + 10 * d + i % 10 for i in range(n)], np.int32)
        for d, n in enumerate(sizes)
    ]
  return sources


def uniform_weights(step):
  del step
  return {language: 1.0 for language in LANGUAGES}


def mean_lengths(sources):
  return {l: np.mean([len(d) for d in docs]) for l, docs in sources.items()}


def make(
    process_index=0,
    process_count=1,
    num_streams=8,
    seq_len=32,
    weights=uniform_weights,
    seed=3,
    sources=None,
):
  sources = sources or make_sources()
  return PackedStreams(
      sources,
      weights,
      mean_document_tokens=mean_lengths(sources),
      seq_len=seq_len,
      num_streams=num_streams,
      streams=process_streams(num_streams, process_index, process_count),
      seed=seed,
      bos_id=BOS,
      eos_id=EOS,
  )


def global_batches(iterators, steps):
  """Concatenates the processes' rows of each step, in process order."""
  out = []
  for _ in range(steps):
    parts = [next(it) for it in iterators]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize('process_count', [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(process_count):
  reference = global_batches([make()], 6)
  sharded = global_batches([make(p, process_count) for p in range(process_count)], 6)
  assert_same(reference, sharded)


def test_rows_are_packed_documents():
  batch = global_batches([make()], 4)
  for step in batch:
    assert step['inputs'].shape == (8, 32)
    assert (step['segment_ids'] > 0).all()  # rows are always full
    for row in range(8):
      seg, inputs, targets, pos = (
          step[k][row] for k in ('segment_ids', 'inputs', 'targets', 'positions')
      )
      for s in np.unique(seg):
        piece = seg == s
        np.testing.assert_array_equal(pos[piece], np.arange(piece.sum()))
        # Within a piece, each target is the next input.
        np.testing.assert_array_equal(targets[piece][:-1], inputs[piece][1:])


def test_stream_reproduces_whole_documents_in_order():
  """Joining a stream's pieces gives [bos] doc [eos] [bos] doc [eos] ... exactly."""
  sources = make_sources()
  it = make(num_streams=2, sources=sources)
  rows = [next(it) for _ in range(30)]
  stream0 = np.concatenate([np.append(r['inputs'][0], -1) for r in rows])
  # Reassemble the token stream from inputs plus the last target of each piece.
  tokens = []
  for r in rows:
    seg, inputs, targets = r['segment_ids'][0], r['inputs'][0], r['targets'][0]
    for s in np.unique(seg):
      piece = seg == s
      tokens.append((inputs[piece], targets[piece][-1]))
  documents, current = [], []
  for inputs, last in tokens:
    current.extend(inputs.tolist())
    if last == EOS:
      current.append(EOS)
      documents.append(current)
      current = []
  assert len(documents) > 10 and stream0.size
  used = {}
  for doc in documents:
    assert doc[0] == BOS and doc[-1] == EOS
    body = np.array(doc[1:-1])
    language, index = divmod(int(body[0]) // 10, 100)
    expected = sources[LANGUAGES[language - 1]][index]
    np.testing.assert_array_equal(body, expected)
    used.setdefault(language, []).append(index)
  for language, indices in used.items():
    # Stream 0 of 2 owns half of each language per epoch: no repeats within it.
    first_epoch = indices[: len(sources[LANGUAGES[language - 1]]) // 2]
    assert len(set(first_epoch)) == len(first_epoch)


def test_streams_never_share_documents():
  """Within an epoch, no document appears in two streams."""
  rng = np.random.default_rng(1)
  sources = {
      language: [np.full(rng.integers(5, 30), 1000 * (l + 1) + d, np.int32) for d in range(300)]
      for l, language in enumerate(LANGUAGES)
  }
  it = make(num_streams=4, sources=sources)
  owner = {}
  for _ in range(10):
    batch = next(it)
    for b in range(4):
      inputs, positions = batch['inputs'][b], batch['positions'][b]
      starts = np.flatnonzero((positions == 0) & (inputs == BOS))
      for start in starts[starts + 1 < len(inputs)]:
        document = int(inputs[start + 1])
        assert owner.setdefault(document, b) == b, f'document {document} in two streams'
  assert len(owner) > 50


def test_state_restores_exactly_and_onto_another_process_count():
  reference = global_batches([make()], 8)
  saving = [make(p, 2) for p in range(2)]
  global_batches(saving, 3)
  states = [it.get_state() for it in saving]
  assert all(len(s) < 2000 for s in states)  # a few integers per stream
  for process_count in (1, 2, 4):
    resumed = [make(p, process_count) for p in range(process_count)]
    for it in resumed:
      it.set_state(states)
      assert it.step == 3
    assert_same(global_batches(resumed, 5), reference[3:])


def test_state_from_another_batch_size_is_refused():
  state = make(num_streams=4).get_state()
  with pytest.raises(ValueError, match='no stream 4: was it saved with a different global batch'):
    make(num_streams=8).set_state(state)


def test_mixture_weights_and_stages():
  def staged(step):
    return {'aaa_Latn': 3.0, 'bbb_Latn': 1.0} if step < 20 else {'ccc_Latn': 1.0}

  it = make(weights=staged, num_streams=16, seq_len=64)
  for _ in range(20):
    next(it)
  tokens = it.tokens_by_language()
  share_a = tokens['aaa_Latn'] / sum(tokens.values())
  assert 'ccc_Latn' not in tokens
  assert 0.7 < share_a < 0.8  # weights are token shares: 3:1 gives about 0.75 of tokens
  before = json.loads(it.get_state())
  for _ in range(5):
    next(it)
  after = json.loads(it.get_state())
  for b, stream in after['streams'].items():
    new_docs = {l: n - before['streams'][b]['taken'].get(l, 0) for l, n in stream['taken'].items()}
    assert new_docs.get('aaa_Latn', 0) == new_docs.get('bbb_Latn', 0) == 0
    assert new_docs['ccc_Latn'] > 0


def test_weights_naming_a_language_without_data_are_refused():
  it = make(weights=lambda step: {'aaa_Latn': 1.0, 'zzz_Latn': 1.0})
  with pytest.raises(ValueError, match='name languages without data: zzz_Latn'):
    next(it)


def test_bos_and_eos_are_optional():
  sources = make_sources()
  it = PackedStreams(
      sources,
      uniform_weights,
      mean_document_tokens=mean_lengths(sources),
      seq_len=32,
      num_streams=2,
      streams=[0, 1],
      seed=0,
      bos_id=None,
      eos_id=None,
  )
  for _ in range(5):
    batch = next(it)
    assert (batch['inputs'] >= 1000).all() and (batch['targets'] >= 1000).all()
    assert (batch['segment_ids'] > 0).all()


@pytest.mark.parametrize('size', [1, 2, 3, 10, 257, 1000])
def test_shuffled_index_is_a_permutation(size):
  for key in (0, 7):
    order = [shuffled_index(key, size, i) for i in range(size)]
    assert sorted(order) == list(range(size))
  if size >= 10:  # different keys give different orders
    assert [shuffled_index(0, size, i) for i in range(size)] != [
        shuffled_index(7, size, i) for i in range(size)
    ]


def test_packing_stats_count_continued_pieces():
  it = make(num_streams=2)
  continued = pieces = 0
  for _ in range(10):
    batch = next(it)
    for row in range(2):
      seg, inputs, pos = batch['segment_ids'][row], batch['inputs'][row], batch['positions'][row]
      starts = np.flatnonzero(pos == 0)
      pieces += len(starts)
      continued += int(np.sum(inputs[starts] != BOS))  # a piece not starting with BOS
      assert len(starts) == seg.max()
  stats = it.packing_stats()
  assert stats['padding_fraction'] == 0.0
  assert stats['continued_fraction'] == pytest.approx(continued / pieces)
  assert 0 < continued < pieces


def language_tokens(batches, language_number):
  """Per stream, the tokens of one language's documents in the order the rows hold them
  (make_sources' tokens name their language: 1000 * (l + 1) + ...)."""
  per_stream = {}
  for batch in batches:
    for b, row in enumerate(batch['inputs']):
      per_stream.setdefault(b, []).extend(int(t) for t in row if t // 1000 == language_number)
  return per_stream


def extra_language(sources):
  """A fourth language, ddd_Latn (tokens 4000 + ...), sorted after the others."""
  rng = np.random.default_rng(7)
  docs = [
      np.array([4000 + 10 * d + i % 10 for i in range(n)], np.int32)
      for d, n in enumerate(rng.integers(1, 40, size=30))
  ]
  return {**sources, 'ddd_Latn': docs}


def make_with(sources):
  return PackedStreams(
      sources,
      lambda step: {language: 1.0 for language in sources},
      mean_document_tokens=mean_lengths(sources),
      seq_len=32,
      num_streams=8,
      streams=range(8),
      seed=3,
      bos_id=BOS,
      eos_id=EOS,
  )


def test_resume_with_a_language_added_and_one_dropped_continues_the_kept_ones(capsys):
  """Saved with aaa, bbb, ccc; resumed with aaa, ccc and a new ddd (bbb dropped, so ccc's
  place in the sorted order moves): every kept language's documents continue exactly
  where the uninterrupted run's do, the new one starts at its first document, and a run
  that takes bbb back continues it too."""
  sources = make_sources()
  reference = make_with(sources)
  reference_batches = [next(reference) for _ in range(40)]
  saving = make_with(sources)
  saved_batches = [next(saving) for _ in range(4)]
  state = saving.get_state()

  changed = {l: d for l, d in extra_language(sources).items() if l != 'bbb_Latn'}
  resumed = make_with(changed)
  resumed.set_state(state)
  note = capsys.readouterr().out
  assert 'kept aaa_Latn, ccc_Latn' in note and 'added ddd_Latn' in note, note
  assert 'dropped bbb_Latn' in note, note
  resumed_batches = [next(resumed) for _ in range(8)]
  for number in (1, 3):  # aaa_Latn, ccc_Latn
    expected = language_tokens(reference_batches, number)
    got = language_tokens(saved_batches + resumed_batches, number)
    before = language_tokens(saved_batches, number)
    for b in range(8):
      assert len(got[b]) > len(before[b])  # it went on after the resume
      assert got[b] == expected[b][: len(got[b])], (number, b)
  assert not any(t // 1000 == 2 for batch in resumed_batches for t in batch['inputs'].flat)
  # ddd_Latn starts with its first document in each stream: index b of its order.
  ddd = language_tokens(resumed_batches, 4)
  firsts = [ddd[b][1] // 10 % 100 for b in range(8) if len(ddd[b]) > 1]  # d of 4000+10d+i
  assert len(set(firsts)) == len(firsts) >= 4  # streams never share a document

  # Back to the original languages: bbb continues where step 4 left it.
  back = make_with(sources)
  back.set_state(resumed.get_state())
  assert 'added bbb_Latn' not in capsys.readouterr().out
  back_batches = [next(back) for _ in range(8)]
  expected = language_tokens(reference_batches, 2)
  got = language_tokens(saved_batches + back_batches, 2)
  partial = {b for b in range(8) if json.loads(state)['streams'][str(b)]['carry']}
  for b in range(8):
    if b in partial and json.loads(state)['streams'][str(b)]['carry'][0] == 'bbb_Latn':
      continue  # the rest of that document was left when bbb was dropped
    assert got[b] == expected[b][: len(got[b])], b


def test_resume_refuses_a_kept_language_whose_documents_changed():
  sources = make_sources()
  saving = make_with(sources)
  next(saving)
  fewer = {**sources, 'bbb_Latn': sources['bbb_Latn'][:-1]}
  with pytest.raises(ConfigError, match=r'bbb_Latn \(35 then, 34 now\) changed since step 1'):
    make_with(fewer).set_state(saving.get_state())


def test_resume_of_an_old_state_without_languages_refuses_a_dropped_language():
  sources = make_sources()
  saving = make_with(sources)
  next(saving)
  old = json.loads(saving.get_state())
  del old['languages'], old['weights']
  kept = {l: d for l, d in sources.items() if l != 'aaa_Latn'}
  with pytest.raises(ConfigError, match='draws from aaa_Latn, which this run does not have'):
    make_with(kept).set_state(json.dumps(old).encode())
  make_with(sources).set_state(json.dumps(old).encode())  # unchanged languages resume
