"""Resuming a real run with other `data.languages`: kept languages continue where they were,
an added one starts fresh, a dropped one's position stays in the checkpoint."""

import json
import os

import pytest

from configs import tiny
from euro_lm.data.dataset import make_data
from euro_lm.train.loop import train

BEFORE = 'deu_Latn,fra_Latn,pol_Latn'
AFTER = 'deu_Latn,ell_Grek,fra_Latn'  # fra_Latn moves from 2nd to 3rd in sorted order


def config(languages, steps):
  c = tiny.get_config()
  c.model.num_layers = 2  # the shapes of test_checkpoint's runs, to share compilations
  c.optimizer.warmup_steps = 5
  c.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=3, seq_len=64)
  c.train.global_batch_size = 8
  c.data.languages = languages
  c.data.mixture = 'explicit'  # equal token shares, so fra_Latn is drawn often enough
  c.data.mixture_weights = ','.join(f'{language}=1' for language in languages.split(','))
  return c


def data_state(workdir, step):
  with open(os.path.join(workdir, 'checkpoints', str(step), 'data', 'process_0-of-1.json')) as f:
    return json.load(f)


@pytest.mark.slow  # two training runs (~45 s on 2 busy cores); tests/test_streams.py checks
# the same continuation on synthetic documents in well under a second
def test_resume_with_a_language_added_and_one_dropped(tmp_path, capsys):
  workdir = str(tmp_path)
  train(config(BEFORE, 3), workdir)
  capsys.readouterr()
  train(config(AFTER, 6), workdir)
  out = capsys.readouterr().out
  assert (
      'data: resuming step 3 with a changed mixture: kept deu_Latn, fra_Latn; added ell_Grek' in out
  ), out
  assert 'dropped pol_Latn' in out, out
  saved, resumed = data_state(workdir, 3), data_state(workdir, 6)
  # The dropped language's position and key stay for a later run; the new one gets its own.
  assert resumed['languages']['pol_Latn'] == saved['languages']['pol_Latn']
  assert resumed['languages']['fra_Latn'] == saved['languages']['fra_Latn']
  assert resumed['languages']['ell_Grek']['key'] == 3
  for b, stream in resumed['streams'].items():
    assert stream['taken'].get('pol_Latn') == saved['streams'][b]['taken'].get('pol_Latn')

  # What the run did is the library's resumed stream: from step 3's state, 3 more steps
  # give step 6's state.
  after = make_data(config(AFTER, 6), workdir).train
  after.set_state(json.dumps(saved).encode())
  for _ in range(3):
    next(after)
  assert json.loads(after.get_state())['streams'] == resumed['streams']
  # Its fra_Latn documents, those taken and the next, are the ones the uninterrupted run
  # takes in each stream (not another shuffle of the language: its sorted place moved).
  before = make_data(config(BEFORE, 6), workdir).train
  streams = len(resumed['streams'])
  compared = 0
  for b, stream in resumed['streams'].items():
    for k in range(stream['taken'].get('fra_Latn', 0) + 1):
      index = k * streams + int(b)
      assert list(after.document_at('fra_Latn', index)) == list(
          before.document_at('fra_Latn', index)
      )
      compared += 1
  assert compared > streams  # some stream took a fra_Latn document in these steps
