"""Every command line answers malformed input with one `error:` line naming what to fix, a
nonzero exit status and no traceback; `--verbose` adds the traceback; a bug keeps its own.

Each command runs in a real process (tests/cli_driver.py: one per command, each case in a
fork of it, through euro_lm.cli's handler as `python -m` would)."""

import json
import os
import subprocess
import sys

import pytest

from euro_lm import provenance
from euro_lm.errors import ConfigError, DataError, read_json_object

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, 'tests', 'cli_driver.py')


def run_cases(module, cases, preload=(), env=None):
  result = subprocess.run(
      [sys.executable, DRIVER, module, json.dumps([args for args, _ in cases]), ','.join(preload)],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout)


def assert_one_error_line(module, cases, results):
  for (args, expected), result in zip(cases, results):
    where = f'python -m {module} {" ".join(args)}:\n{result["stderr"]}'
    errors = [l for l in result['stderr'].splitlines() if l.startswith('error:')]
    assert result['status'] not in (0, None), where
    assert len(errors) == 1, where
    assert 'Traceback' not in result['stderr'], where
    assert expected in errors[0], where


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('inputs')
  (d / 'docs.jsonl').write_text('{"text": "Hallo Welt", "lang": "deu_Latn"}\n')
  (d / 'garbage.model').write_bytes(b'\x00\x01 not a tokenizer \xff' * 10)
  (d / 'a_file').write_text('x')
  (d / 'binary').write_bytes(b'\xff\xfe[]')
  answered = [{'role': 'user', 'content': 'Hallo'}, {'role': 'assistant', 'content': 'Hallo!'}]
  (d / 'answered.jsonl').write_text(json.dumps({'messages': answered}) + '\n')
  (d / 'hf_without_config').mkdir()
  (d / 'bad_run').mkdir()
  (d / 'bad_run' / 'config.json').write_text('{"model": ')
  return d


def test_train(files, tmp_path):
  workdir = f'--workdir={tmp_path / "run"}'
  tiny = '--config=configs/tiny.py'
  cases = [
      ([workdir, '--config=configs/nope.py'], "config file 'configs/nope.py' does not exist"),
      (
          [workdir, '--config=configs/nope.py', '--config.train.steps=3'],
          "config file 'configs/nope.py' does not exist",
      ),
      ([workdir, '--config=configs'], "config file 'configs' is not a file"),
      ([workdir, f'{tiny}:typo'], "config tiny.py has no variant 'typo' (it has no variants)"),
      ([workdir, tiny, '--config.train.steps=abc'], 'flag --config.train.steps=abc'),
      ([workdir, tiny, '--config.train.nope=3'], "unknown config field 'nope'"),
      ([workdir, tiny, '--bogus=1'], "Unknown command line flag 'bogus'"),
      ([tiny], 'Flag --workdir must have a value'),
      ([workdir, tiny, 'extra'], 'unexpected arguments: extra'),
      (
          [workdir, tiny, '--config.optimizer.learning_rate=-1'],
          'optimizer.learning_rate=-1.0 must be >= 0',
      ),
      (
          [workdir, tiny, '--config.optimizer.learning_rate=inf'],
          'optimizer.learning_rate=inf must be >= 0',
      ),
      ([workdir, tiny, '--config.optimizer.b2=1.0'], 'optimizer.b2=1.0 must be in [0, 1)'),
      ([workdir, tiny, '--config.model.norm_eps=0'], 'model.norm_eps=0.0 must be > 0'),
      ([workdir, tiny, '--config.train.global_batch_size=0'], 'train.global_batch_size=0'),
      ([workdir, tiny, '--config.data.valid_fraction=0.9'], 'data.valid_fraction=0.9'),
      ([tiny, f'--workdir={files / "a_file"}'], f'workdir {files / "a_file"} is not usable'),
      (
          [
              workdir,
              tiny,
              '--config.data.corpus=prepared',
              f'--config.data.prepared_dir={files / "missing"}',
          ],
          str(files / 'missing'),
      ),
      (
          [workdir, tiny, f'--config.data.tokenizer_path={files / "garbage.model"}'],
          str(files / 'garbage.model'),
      ),
  ]
  results = run_cases('euro_lm.train', cases, preload=['euro_lm.train.loop'])
  assert_one_error_line('euro_lm.train', cases, results)


def test_plan_and_benchmarks():
  for module, cases in (
      (
          'euro_lm.plan',
          [
              (
                  ['--config=configs/llama_1b.py:gpux'],
                  "config llama_1b.py has no variant 'gpux' (its variants: gpu)",
              ),
              (
                  ['--config=configs/llama_1b.py', '--devices=3'],
                  'not divisible by the data-parallel size 3',
              ),
          ],
      ),
      (
          'euro_lm.bench.train_step',  # what `python -m euro_lm.bench` runs
          [(['--config=configs/llama_125m.py:bf61'], "no variant 'bf61' (its variants: bf16)")],
      ),
      ('euro_lm.bench.checkpoint', [(['--config=nope.py'], "config file 'nope.py' does not")]),
      (
          'euro_lm.bench.profile',
          [
              (['--config=nope.py'], "config file 'nope.py' does not"),
              (['--config=configs/tiny.py', '--steps=0'], '--steps must be at least 1'),
          ],
      ),
  ):
    assert_one_error_line(module, cases, run_cases(module, cases))


def test_prepare_data_and_train_tokenizer(files, tmp_path):
  docs, out = str(files / 'docs.jsonl'), f'--output={tmp_path / "out"}'
  lang = '--language=deu_Latn'
  cases = [
      (
          [f'--input={tmp_path}/none*.jsonl', out, lang, f'--tokenizer={files / "garbage.model"}'],
          'matches no file',
      ),
      ([f'--input={docs}', out, lang, f'--tokenizer={tmp_path / "missing.model"}'], 'missing'),
      ([f'--input={docs}', out, lang, f'--tokenizer={files / "garbage.model"}'], 'garbage.model'),
      ([f'--input={docs}', out, lang, '--docs_per_shard=many'], 'flag --docs_per_shard=many'),
      ([f'--input={docs}', out, lang], 'Flag --tokenizer must have a value'),
      (
          [f'--input={docs}', out, f'--tokenizer={files / "garbage.model"}'],
          'Set exactly one of language',
      ),
      (
          [f'--input={docs}', out, lang, '--tokenizer=t', '--chat_template_kwargs={}'],
          '--chat_template_kwargs is for conversations: add --chat',
      ),
      (
          [f'--input={docs}', out, lang, '--tokenizer=t', '--chat', '--chat_template_kwargs=[1]'],
          "--chat_template_kwargs='[1]' is not a JSON object",
      ),
  ]
  assert_one_error_line('euro_lm.prepare_data', cases, run_cases('euro_lm.prepare_data', cases))
  cases = [
      ([out, f'--input={tmp_path}/none*.jsonl', lang], 'matches no file'),
      ([out, '--vocab_size=big'], 'flag --vocab_size=big'),
      ([out, '--sampling=nope'], 'flag --sampling=nope'),
      ([], 'Flag --output must have a value'),
  ]
  assert_one_error_line(
      'euro_lm.train_tokenizer', cases, run_cases('euro_lm.train_tokenizer', cases)
  )


def test_import_export_generate(files, tmp_path):
  missing = tmp_path / 'missing'
  existing = files / 'answered.jsonl'  # an earlier run's answers, not to be overwritten
  existing_bytes = existing.read_bytes()
  stopped = tmp_path / 'stopped.jsonl'  # a run that stopped left stopped.jsonl.tmp
  (tmp_path / 'stopped.jsonl.tmp').write_bytes(existing_bytes)
  for module, preload, cases in (
      (
          'euro_lm.import_hf',
          ['euro_lm.hf'],
          [
              ([f'--hf={missing}', f'--workdir={tmp_path / "w"}'], str(missing)),
              (
                  [f'--hf={files / "hf_without_config"}', f'--workdir={tmp_path / "w"}'],
                  'config.json',
              ),
              ([f'--hf={missing}'], 'Flag --workdir must have a value'),
          ],
      ),
      (
          'euro_lm.export_hf',
          ['euro_lm.hf'],
          [
              ([f'--workdir={missing}', f'--output={tmp_path / "o"}'], str(missing)),
              ([f'--workdir={missing}', f'--output={tmp_path / "o"}', '--dtype=int4'], 'int4'),
          ],
      ),
      (
          'euro_lm.generate',
          [],
          [
              ([f'--workdir={missing}', '--prompt=Hallo'], str(missing)),
              ([f'--workdir={files / "bad_run"}', '--prompt=Hallo'], 'is not valid JSON'),
              ([f'--workdir={missing}'], 'at least one --prompt'),
              ([f'--workdir={missing}', '--prompt=x', '--top_k=-1x'], 'flag --top_k=-1x'),
              (
                  [f'--workdir={missing}', '--conversations=c.jsonl', '--prompt=x', '--tools=t'],
                  '--conversations takes no --prompt or --tools',
              ),
              ([f'--workdir={missing}', '--prompt=x', '--system=Be brief.'], 'need --chat'),
              (
                  [f'--workdir={missing}', '--chat', '--prompt=x', '--chat_template_kwargs=[]'],
                  "--chat_template_kwargs='[]' is not a JSON object",
              ),
              (
                  [f'--workdir={missing}', '--prompt=x', '--chat', f'--tools={files / "binary"}'],
                  f'{files / "binary"}: not UTF-8 text (byte 0)',
              ),
              (
                  [f'--workdir={missing}', '--prompt=x', '--chat', f'--tools={files / "a_file"}'],
                  f'{files / "a_file"}: line 1: not JSON',
              ),
              (
                  [
                      f'--workdir={missing}',
                      '--prompt=x',
                      '--chat',
                      f'--tools={files / "docs.jsonl"}',
                  ],
                  "docs.jsonl: 'tools' is not a list of objects",
              ),
              (
                  [f'--workdir={missing}', f'--conversations={files / "docs.jsonl"}'],
                  f"{files / 'docs.jsonl'}:1: no 'messages'",
              ),
              (
                  [f'--workdir={missing}', f'--conversations={files / "answered.jsonl"}'],
                  f"{files / 'answered.jsonl'}:1: message 1 has role 'assistant'; a prompt ends",
              ),
              ([f'--workdir={missing}', '--prompt=x', '--batch_size=0'], '--batch_size=0 must'),
              (
                  [f'--workdir={missing}', '--prompt=x', f'--output={existing}'],
                  f'--output={existing} exists',
              ),
              (
                  [f'--workdir={missing}', '--prompt=x', f'--output={stopped}'],
                  f'--output={stopped}: {stopped}.tmp exists, the answers of a run that stopped',
              ),
              (
                  [f'--workdir={missing}', '--prompt=x', f'--output={missing / "a.jsonl"}'],
                  f'--output={missing / "a.jsonl"}: no directory {missing}',
              ),
          ],
      ),
  ):
    assert_one_error_line(module, cases, run_cases(module, cases, preload))
  assert existing.read_bytes() == existing_bytes
  assert not os.path.exists(f'{existing}.tmp')
  assert (tmp_path / 'stopped.jsonl.tmp').read_bytes() == existing_bytes


def test_verbose_adds_the_traceback_and_a_bug_keeps_it(tmp_path):
  """--verbose and EURO_LM_VERBOSE=1 print the traceback before the error line; an
  exception that is not a user's error is printed with its traceback always."""
  args = [f'--workdir={tmp_path / "missing"}', '--prompt=Hallo']
  for extra, env in (
      (['--verbose'], None),
      ([], {**os.environ, 'EURO_LM_VERBOSE': '1'}),
  ):
    (result,) = run_cases('euro_lm.generate', [(args + extra, '')], env=env)
    assert result['status'] == 1
    assert 'Traceback' in result['stderr'], result['stderr']
    assert result['stderr'].splitlines()[-1].startswith('error: no config.json in')

  # A bug: a config file whose get_config divides by zero.
  (tmp_path / 'buggy.py').write_text('def get_config(arg=None):\n  return 1 // 0\n')
  cases = [([f'--config={tmp_path / "buggy.py"}', f'--workdir={tmp_path / "w"}'], '')]
  (result,) = run_cases('euro_lm.train', cases)
  assert result['status'] == 1
  assert 'Traceback' in result['stderr'] and 'ZeroDivisionError' in result['stderr']
  assert result['stderr'].splitlines()[-1].startswith('error: reading the command line failed')


def test_a_json_file_that_is_not_an_object_is_the_callers_error_naming_it(tmp_path):
  good, broken, listed = tmp_path / 'good.json', tmp_path / 'broken.json', tmp_path / 'list.json'
  good.write_text('{"a": 1}')
  broken.write_text('{"a": ')
  listed.write_text('[1]')
  assert read_json_object(good, DataError) == {'a': 1}
  for path, expected in (
      (tmp_path / 'missing.json', 'missing.json is not valid JSON: '),
      (broken, 'broken.json is not valid JSON: '),
      (listed, 'list.json is not a JSON object'),
  ):
    with pytest.raises(DataError, match=expected):
      read_json_object(path, DataError)
  with pytest.raises(ConfigError, match='list.json is not a JSON object of source fields'):
    provenance.read_source_file(str(listed))
