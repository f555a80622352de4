"""An installed wheel works without the checkout: built with `pip wheel`, installed into a
fresh directory, and run from a directory outside the repository, the command lines import
a Hugging Face model, train from the config import_hf wrote, export and generate."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from euro_lm.data.tokenizer import train_sentencepiece

REPO = pathlib.Path(__file__).resolve().parent.parent
TEXTS = [
    'Guten Tag, wie geht es Ihnen heute?',
    'Bonjour, comment allez-vous ce matin ?',
    'Buenos días, ¿cómo está usted hoy?',
    'Dzień dobry, jak się pan dziś miewa?',
] * 20


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """The site directory holding the installed euro_lm wheel (and nothing else)."""
  root = tmp_path_factory.mktemp('wheel')
  source = root / 'source'  # a copy: building writes build/ and egg-info next to setup.cfg
  shutil.copytree(
      REPO / 'euro_lm', source / 'euro_lm', ignore=shutil.ignore_patterns('__pycache__')
  )
  for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
    shutil.copy(REPO / name, source / name)
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
  subprocess.run(
      [*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', str(root / 'dist'), str(source)],
      check=True,
      capture_output=True,
  )
  (wheel,) = (root / 'dist').glob('euro_lm-*.whl')
  subprocess.run(
      [*pip, 'install', '--no-deps', '--no-index', '--target', str(root / 'site'), str(wheel)],
      check=True,
      capture_output=True,
  )
  return root / 'site'


def test_the_wheel_imports_trains_exports_and_generates_outside_the_checkout(installed, tmp_path):
  hf_dir, elsewhere = tmp_path / 'hf', tmp_path / 'elsewhere'
  elsewhere.mkdir()
  tokenizer = train_sentencepiece(TEXTS, str(tmp_path / 'tokenizer.model'), vocab_size=320)
  config = transformers.LlamaConfig(
      vocab_size=tokenizer.vocab_size,
      hidden_size=64,
      intermediate_size=96,
      num_attention_heads=4,
      num_key_value_heads=2,
      num_hidden_layers=2,
      max_position_embeddings=64,
      tie_word_embeddings=False,
  )
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(hf_dir, safe_serialization=True)
  shutil.copy(tmp_path / 'tokenizer.model', hf_dir / 'tokenizer.model')
  # The installed wheel first; the checkout neither on the path nor the working directory.
  env = dict(os.environ, PYTHONPATH=str(installed), JAX_PLATFORMS='cpu')

  def run(*args):
    done = subprocess.run(
        [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

  where = run(
      '-c',
      'import euro_lm, importlib.util; print(euro_lm.__file__); '
      "print(importlib.util.find_spec('configs'))",
  )
  assert where.splitlines() == [str(installed / 'euro_lm' / '__init__.py'), 'None']
  run('-m', 'euro_lm.import_hf', f'--hf={hf_dir}', '--workdir=imported')
  run(
      '-m',
      'euro_lm.train',
      '--config=imported/hf_config.py',
      '--workdir=run',
      '--config.train.steps=2',
      '--config.train.global_batch_size=8',
      '--config.train.seq_len=32',
      '--config.train.log_every=1',
      '--config.train.eval_every=0',
      '--config.data.languages=deu_Latn,fra_Latn',
  )
  run('-m', 'euro_lm.export_hf', '--workdir=run', '--output=exported', '--dtype=float32')
  exported = transformers.AutoModelForCausalLM.from_pretrained(elsewhere / 'exported')
  assert exported.config.num_hidden_layers == 2
  assert exported.config.vocab_size == tokenizer.vocab_size
  out = run(
      '-m',
      'euro_lm.generate',
      '--workdir=run',
      '--prompt=Guten Tag',
      '--max_new_tokens=4',
      '--temperature=0',
  )
  assert "--- 'Guten Tag'" in out
