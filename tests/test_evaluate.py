"""`python -m euro_lm.evaluate`: per-language scores of a checkpoint on held-out files,
against the run's own in-training validation on the same text, an independent per-token
computation with `model.apply`, and the command line end to end."""

import gzip
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from euro_lm.data import corpus
from euro_lm.data.prepare.sources import TextSource
from euro_lm.errors import UserError
from euro_lm.evaluation import held_out
from euro_lm.inference import load_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGUAGES = 'en,fr,de'  # those of conftest.py's small_run
SEQ_LEN = 32
# The same sentence in three languages: short enough that each is one segment of a row.
PARALLEL = {
    'eng_Latn': ['The weather is nice today.', 'Where is the station?'],
    'fra_Latn': ["Il fait beau aujourd'hui.", 'Où est la gare ?'],
    'deu_Latn': ['Das Wetter ist heute schön.', 'Wo ist der Bahnhof?'],
}


@pytest.fixture
def run_dir(small_run):
  """conftest.py's two-step run (LANGUAGES, SEQ_LEN), validated on every held-out document."""
  return small_run


def write_jsonl(path, documents):
  with open(path, 'w', encoding='utf-8') as f:
    for language, docs in documents.items():
      for doc in docs:
        f.write(json.dumps({'text': doc, 'lang': language}, ensure_ascii=False) + '\n')
  return str(path)


def final_validation(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if 'valid/loss' in r][-1]


def test_scores_equal_the_runs_own_validation(run_dir, tmp_path):
  """The run's validation split of the embedded corpus, as a user's held-out file: the
  same loss, perplexity and bits per byte per language as the run logged at its last step."""
  docs = corpus.select_languages(corpus.load_embedded_corpus(), LANGUAGES)
  _, valid = corpus.split_train_valid(docs, tiny.get_config().data.valid_fraction)
  path = write_jsonl(tmp_path / 'valid.jsonl', valid)
  result = held_out.evaluate_workdir(
      run_dir, [path], TextSource(language_field='lang'), log=lambda *_: None
  )
  logged = final_validation(run_dir)
  assert result['step'] == logged['step'] == 2
  assert sorted(result['languages']) == sorted(valid)
  for language, scores in result['languages'].items():
    assert scores['documents'] == len(valid[language])
    for metric in ('loss', 'perplexity', 'bpb'):
      np.testing.assert_allclose(
          scores[metric], logged[f'valid/{language}/{metric}'], rtol=1e-6, err_msg=metric
      )
  np.testing.assert_allclose(result['mean']['loss'], logged['valid/loss'], rtol=1e-6)


def test_scores_equal_a_per_token_reference(run_dir, tmp_path):
  """Each short document scored alone with `model.apply` over [bos] + ids + [eos]: the
  summed negative log-likelihood and target bytes give the same loss and bits per byte;
  on a parallel set, each language's total against the pivot's."""
  path = write_jsonl(tmp_path / 'parallel.jsonl', PARALLEL)
  result = held_out.evaluate_workdir(
      run_dir,
      [path],
      TextSource(language_field='lang'),
      pivot='en',
      batch_size=8,
      log=lambda *_: None,
  )
  run = load_run(run_dir)
  tok = run.tokenizer
  token_bytes = tok.token_bytes()
  apply = jax.jit(run.model.apply)
  totals = {}
  for language, docs in PARALLEL.items():
    nll, tokens, nbytes = 0.0, 0, 0
    for doc in docs:
      ids = np.asarray([tok.bos_id, *tok.encode(doc), tok.eos_id], np.int32)
      assert len(ids) <= SEQ_LEN
      logits = np.asarray(apply({'params': run.params}, ids[None, :-1])[0], np.float64)
      logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
      nll += float(np.sum(logz - logits[np.arange(len(ids) - 1), ids[1:]]))
      tokens += len(ids) - 1
      nbytes += int(np.sum(token_bytes[ids[1:]]))
    totals[language] = nll
    scores = result['languages'][language]
    assert (scores['documents'], scores['tokens'], scores['bytes']) == (len(docs), tokens, nbytes)
    np.testing.assert_allclose(scores['loss'], nll / tokens, rtol=2e-5)
    np.testing.assert_allclose(scores['bpb'], nll / math.log(2) / nbytes, rtol=2e-5)
  for language, nll in totals.items():
    np.testing.assert_allclose(
        result['languages'][language]['relative_to_pivot'], nll / totals['eng_Latn'], rtol=2e-5
    )
  assert result['pivot'] == 'eng_Latn'
  assert 'vs eng_Latn' in held_out.format_table(result)


def test_a_pivot_needs_a_parallel_set(run_dir, tmp_path):
  uneven = dict(PARALLEL, deu_Latn=PARALLEL['deu_Latn'][:1])
  path = write_jsonl(tmp_path / 'uneven.jsonl', uneven)
  source = TextSource(language_field='lang')
  with pytest.raises(UserError, match='deu_Latn: 1, eng_Latn: 2'):
    held_out.evaluate_workdir(run_dir, [path], source, pivot='eng_Latn', log=lambda *_: None)
  with pytest.raises(UserError, match='--pivot=pol_Latn: not among the languages read'):
    held_out.evaluate_workdir(run_dir, [path], source, pivot='pl', log=lambda *_: None)


def test_cut_empty_and_bad_inputs_are_warned_and_recorded(run_dir, tmp_path):
  """A score is never of less text than given, unsaid: a .jsonl.gz whose second member is
  cut short keeps its first member's documents, and it, an empty file and a bad record are
  `warning:` lines and in the result; strict, the cut file is an error."""
  whole = write_jsonl(tmp_path / 'parallel.jsonl', PARALLEL)
  with open(whole, 'rb') as f:
    lines = f.readlines()
  cut = tmp_path / 'cut.jsonl.gz'
  second = gzip.compress(b''.join(lines[3:]))
  cut.write_bytes(gzip.compress(b''.join(lines[:3])) + second[:12])
  empty = tmp_path / 'empty.jsonl'
  empty.write_bytes(b'')
  bad = tmp_path / 'bad.jsonl'
  bad.write_bytes(lines[0] + b'{"text": 5, "lang": "en"}\n')
  logged = []
  result = held_out.evaluate_workdir(
      run_dir,
      [str(cut), str(empty), str(bad)],
      TextSource(language_field='lang'),
      log=logged.append,
  )
  documents = [json.loads(line) for line in lines[:3] + lines[:1]]
  for language in PARALLEL:
    expected = sum(d['lang'] == language for d in documents)
    assert result['languages'].get(language, {}).get('documents', 0) == expected
  warnings = [line for line in logged if line.startswith('warning: ')]
  assert warnings == [  # in the order of the files' names
      f"warning: skipped bad records: {bad}: 1 not_a_string (first at line 2: 'text' is a"
      ' int, not a string)',
      f'warning: {cut}: truncated at byte {len(cut.read_bytes())}: the file ends inside a gzip'
      ' frame (cut short); lines from 4 on are lost.',
      f'warning: {empty}: holds no records (an empty file).',
  ]
  assert result['truncated'] == {
      str(cut): {
          'byte': len(cut.read_bytes()),
          'line': 4,
          'reason': 'the file ends inside a gzip frame (cut short)',
      }
  }
  assert result['bad_records'][str(bad)]['kinds']['not_a_string']['first'] == 2
  with pytest.raises(UserError, match=f'^{cut}: truncated at byte '):
    held_out.evaluate_workdir(
        run_dir, [str(cut)], TextSource(language_field='lang', strict=True), log=logged.append
    )


def _evaluate_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run(
      [sys.executable, '-m', 'euro_lm.evaluate', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )


def test_cli_writes_the_result_file(run_dir, tmp_path):
  path = write_jsonl(tmp_path / 'parallel.jsonl', PARALLEL)
  output = tmp_path / 'result.json'
  result = _evaluate_cli(
      f'--workdir={run_dir}',
      f'--input={path}',
      '--language_field=lang',
      '--pivot=eng_Latn',
      f'--output={output}',
      '--set=model.attention_impl=xla',
  )
  assert result.returncode == 0, result.stderr
  written = json.loads(output.read_text())
  expected = held_out.evaluate_workdir(
      run_dir, [path], TextSource(language_field='lang'), log=lambda *_: None
  )
  assert written['step'] == 2 and written['inputs'] == [path]
  for language, scores in expected['languages'].items():
    for key in ('documents', 'tokens', 'bytes'):
      assert written['languages'][language][key] == scores[key]
    for key in ('loss', 'perplexity', 'bpb'):
      np.testing.assert_allclose(written['languages'][language][key], scores[key], rtol=1e-6)
  assert 'fra_Latn' in result.stdout and f'wrote {output}' in result.stdout


@pytest.mark.parametrize(
    'args, message',
    [
        (['--input=/nonexistent/*.jsonl', '--language_field=lang'], '/nonexistent/*.jsonl'),
        (['--input={held_out}', '--language_field=lang', '--set=model.nope=1'], 'model.nope=1'),
        (['--input={held_out}', '--language_field=lang', '--set=train.seq_len=x'], 'seq_len'),
        (['--input={held_out}', '--language_field=lang', '--step=9'], 'no checkpoint for step 9'),
    ],
)
def test_cli_bad_input_is_one_error_line(run_dir, tmp_path, args, message):
  path = write_jsonl(tmp_path / 'held_out.jsonl', PARALLEL)
  result = _evaluate_cli(f'--workdir={run_dir}', *(a.format(held_out=path) for a in args))
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
