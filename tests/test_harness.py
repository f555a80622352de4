"""lm-evaluation-harness on euro_lm's JAX model against lm-eval's own Hugging Face model on
the float32 export: local tasks of each output type (multiple choice, rolling
loglikelihood, generation), the same accuracies, log-likelihoods within 1e-4 and the same
generations, per sample."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

# lm-eval reads tasks with `datasets`: local files only, cached in a scratch directory.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_CACHE', tempfile.mkdtemp(prefix='euro_lm_datasets_'))

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from euro_lm import hf  # noqa: E402
from euro_lm.data.tokenizer import load_tokenizer  # noqa: E402
from euro_lm.errors import ConfigError  # noqa: E402
from euro_lm.evaluation.harness import EuroLM  # noqa: E402
from euro_lm.inference import load_config  # noqa: E402
from tests.chat_templates import LLAMA3  # noqa: E402
from tests.hf_tokenizers import make_tokenizer_folder  # noqa: E402
from tests.test_hf import HF_SHAPES, random_hf_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 32  # short, so rolling texts span several windows

CHOICES = [
    {
        'question': 'Die Hauptstadt von Frankreich ist',
        'choices': ['Paris', 'Berlin', 'Rom'],
        'gold': 0,
    },
    {
        'question': 'Η πρωτεύουσα της Ελλάδας είναι',
        'choices': ['Αθήνα', 'Σόφια', 'Ρώμη'],
        'gold': 0,
    },
    {
        'question': 'La capitale della Polonia è',
        'choices': ['Praga', 'Varsavia', 'Vienna'],
        'gold': 1,
    },
    {'question': 'Stolica Czech to', 'choices': ['Bratysława', 'Budapeszt', 'Praga'], 'gold': 2},
]
TEXTS = [
    {'text': 'Grüße aus München! Die Straße ist schön, und der Himmel ist blau über den Alpen.'},
    {'text': 'Καλημέρα κόσμε· η θάλασσα είναι ήρεμη σήμερα το πρωί.'},
    {'text': 'Здравейте! Българският език има кирилица.'},
]
PROMPTS = [
    {'prompt': 'Q: Wie heißt du?\nA:', 'answer': 'Anna'},
    {'prompt': 'Q: Πού μένεις;\nA:', 'answer': 'Αθήνα'},
    {'prompt': 'Q: Jak się masz?\nA:', 'answer': 'Dobrze'},
]

TASKS = {
    'euro_choice': (
        CHOICES,
        """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
""",
    ),
    'euro_rolling': (
        TEXTS,
        """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    ),
    'euro_generate': (
        PROMPTS,
        """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
    ),
}


def write_tasks(directory):
  """Each task as a YAML with its documents in a local JSONL file."""
  for name, (docs, body) in TASKS.items():
    data = os.path.join(directory, f'{name}.jsonl')
    with open(data, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(d, ensure_ascii=False) + '\n' for d in docs)
    with open(os.path.join(directory, f'{name}.yaml'), 'w', encoding='utf-8') as f:
      f.write(
          f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
          f'    test: {data}\ntest_split: test\n{body}'
      )
  return str(directory)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """A random Llama with a Llama 3 style tokenizer, imported, and its float32 export."""
  root = tmp_path_factory.mktemp('harness')
  tokenizer_dir = make_tokenizer_folder('llama3', root / 'tokenizer')
  vocab_size = load_tokenizer(tokenizer_dir).vocab_size
  hf_dir = root / 'hf'
  random_hf_model({**HF_SHAPES['gqa_untied'], 'vocab_size': vocab_size}).save_pretrained(hf_dir)
  for file in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, file), hf_dir)
  workdir = str(root / 'imported')
  hf.import_hf(str(hf_dir), workdir, log=lambda *_: None)
  export = str(root / 'export')
  hf.export_hf(workdir, export, dtype='float32', log=lambda *_: None)
  (root / 'tasks').mkdir()
  return workdir, export, write_tasks(root / 'tasks')


@pytest.fixture(scope='module')
def task_manager(models):
  """One lm-eval TaskManager of the tasks for every evaluation here: building one indexes
  all of lm-eval's own tasks (seconds each time)."""
  return TaskManager(include_path=models[2])


def evaluate(model, task_manager, **kwargs):
  return lm_eval.simple_evaluate(
      model=model,
      tasks=list(TASKS),
      task_manager=task_manager,
      log_samples=True,
      **kwargs,
  )


def sample_responses(result, task):
  """Every response of every request, in document order (a request's repeats flattened)."""
  samples = sorted(result['samples'][task], key=lambda s: s['doc_id'])
  return [r for s in samples for request in s['resps'] for r in request]


@pytest.mark.parametrize('add_bos_token', [None, False])
def test_every_output_type_equals_lm_evals_hf_model_on_the_export(
    models, task_manager, add_bos_token
):
  workdir, export, _ = models
  ours = evaluate(
      EuroLM(workdir, batch_size=4, max_length=MAX_LENGTH, add_bos_token=add_bos_token),
      task_manager,
  )
  model_args = f'pretrained={export},dtype=float32,max_length={MAX_LENGTH}'
  if add_bos_token is not None:
    model_args += f',add_bos_token={add_bos_token}'
  theirs = evaluate('hf', task_manager, model_args=model_args, batch_size=4, device='cpu')
  for task in TASKS:
    mine, reference = sample_responses(ours, task), sample_responses(theirs, task)
    assert len(mine) == len(reference) == len(TASKS[task][0]) * (3 if task == 'euro_choice' else 1)
    for a, b in zip(mine, reference):
      if task == 'euro_generate':
        assert a == b
      elif task == 'euro_choice':
        (ll_a, greedy_a), (ll_b, greedy_b) = a, b
        np.testing.assert_allclose(ll_a, ll_b, atol=1e-4)
        assert greedy_a == greedy_b
      else:
        np.testing.assert_allclose(a, b, atol=1e-4)
    for metric, value in theirs['results'][task].items():
      if isinstance(value, float) and not metric.endswith('_stderr,none'):
        np.testing.assert_allclose(ours['results'][task][metric], value, rtol=1e-5, err_msg=metric)


def test_bos_before_a_rolling_text_counts_twice_with_the_tokenizers_default(models):
  """With the tokenizer's default (BOS added) a rolling window starts BOS, BOS: the first
  window scores the text after two BOS tokens, as lm-eval's hf model does."""
  workdir, _, _ = models
  model = EuroLM(workdir, batch_size=4, max_length=MAX_LENGTH)
  text = TEXTS[0]['text']
  ids = model.tok_encode(text)
  bos = model.prefix_token_id
  assert ids[0] == bos and model.tok_encode(text, add_special_tokens=False) == ids[1:]
  model.add_bos_token = False
  assert model.tok_encode(text) == ids[1:]


def _instance(kind, args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=('t', 0, 1))


def test_edge_requests_equal_lm_evals_hf_model(models):
  """Request by request against lm-eval's hf model on the export: a context, a rolling text
  and a prompt that start with the BOS text get no second BOS; a continuation longer than
  max_length is refused by both, not scored in part."""
  workdir, export, _ = models
  ours = EuroLM(workdir, batch_size=2, max_length=MAX_LENGTH)
  theirs = HFLM(
      pretrained=export, dtype='float32', max_length=MAX_LENGTH, batch_size=2, device='cpu'
  )
  bos = load_tokenizer(os.path.join(workdir, 'tokenizer')).special_tokens['bos_token']
  assert bos == '<|begin_of_text|>'
  requests = {
      'loglikelihood': [_instance('loglikelihood', (bos + CHOICES[0]['question'], ' Paris'))],
      'loglikelihood_rolling': [_instance('loglikelihood_rolling', (bos + TEXTS[0]['text'],))],
      'generate_until': [
          _instance(
              'generate_until',
              (
                  bos + PROMPTS[0]['prompt'],
                  {'until': ['\n'], 'max_gen_toks': 6, 'do_sample': False},
              ),
          )
      ],
  }
  for kind, batch in requests.items():
    mine, reference = getattr(ours, kind)(batch), getattr(theirs, kind)(batch)
    if kind == 'loglikelihood':
      np.testing.assert_allclose(mine[0][0], reference[0][0], atol=1e-4)
      assert mine[0][1] == reference[0][1]
    elif kind == 'loglikelihood_rolling':
      np.testing.assert_allclose(mine, reference, atol=1e-4)
    else:
      assert mine == reference
  long = [_instance('loglikelihood', ('x', ' Straße' * 40))]
  with pytest.raises(ConfigError, match='tokens is longer than max_length=32'):
    ours.loglikelihood(long)
  with pytest.raises(AssertionError):
    theirs.loglikelihood(long)


@pytest.mark.parametrize('add_bos_token', [None, True, False])
def test_tok_encode_equals_lm_evals_hf_model(models, add_bos_token):
  """Every add_special_tokens lm-eval may pass, under each add_bos_token setting."""
  workdir, export, _ = models
  ours = EuroLM(workdir, batch_size=2, max_length=MAX_LENGTH, add_bos_token=add_bos_token)
  kwargs = {} if add_bos_token is None else {'add_bos_token': add_bos_token}
  theirs = HFLM(pretrained=export, dtype='float32', max_length=MAX_LENGTH, device='cpu', **kwargs)
  for text in (CHOICES[1]['question'], '<|begin_of_text|>' + TEXTS[0]['text'], ' Paris'):
    for add_special_tokens in (None, True, False):
      assert ours.tok_encode(text, add_special_tokens) == theirs.tok_encode(
          text, add_special_tokens
      ), (text, add_special_tokens)


def test_the_default_max_length_is_what_the_export_declares(models, tmp_path):
  """lm-eval's hf model reads max_position_embeddings: the run's seq_len, or an imported
  base model's longer context (8192 here), which a fine-tuned export keeps declaring."""
  workdir, export, _ = models
  hf_dir = tmp_path / 'hf'
  shutil.copytree(os.path.join(workdir, '..', 'hf'), hf_dir)
  with open(hf_dir / 'config.json', encoding='utf-8') as f:
    config = json.load(f)
  with open(hf_dir / 'config.json', 'w', encoding='utf-8') as f:
    json.dump(config | {'max_position_embeddings': 8192}, f)
  long_workdir, long_export = str(tmp_path / 'imported'), str(tmp_path / 'export')
  hf.import_hf(str(hf_dir), long_workdir, log=lambda *_: None)
  hf.export_hf(long_workdir, long_export, dtype='float32', log=lambda *_: None)
  for run, folder, declared in ((workdir, export, None), (long_workdir, long_export, 8192)):
    theirs = HFLM(pretrained=folder, dtype='float32', device='cpu').max_length
    assert EuroLM(run, batch_size=2).max_length == theirs
    assert declared is None or theirs == declared


def test_lm_evals_model_arguments(models):
  """What `simple_evaluate(model='euro_lm', batch_size=..., device=...)` passes: 'auto' is
  the run's training batch, capped by max_batch_size; a device JAX does not run on is one
  error."""
  workdir, _, _ = models
  batch = load_config(workdir).train.global_batch_size
  model = EuroLM.create_from_arg_string(
      f'workdir={workdir}', {'batch_size': 'auto', 'max_batch_size': None, 'device': 'cpu'}
  )
  assert model.batch_size == batch
  capped = EuroLM.create_from_arg_string(
      f'workdir={workdir}', {'batch_size': 'auto:4', 'max_batch_size': batch // 2}
  )
  assert capped.batch_size == batch // 2
  with pytest.raises(ConfigError, match=r'device=cuda:0: JAX runs on cpu here'):
    EuroLM(workdir, device='cuda:0')


def _stop_ids(export):
  with open(os.path.join(export, 'generation_config.json'), encoding='utf-8') as f:
    ids = json.load(f)['eos_token_id']
  return ids if isinstance(ids, list) else [ids]


def test_a_chat_run_stops_where_its_export_does(models, tmp_path):
  """A run fine-tuned with a chat template (its workdir holds it) ends generations at the
  template's end of turn as well as EOS, and an imported model at its folder's stop ids
  (generation_config.json): the ids its export's generation_config lists."""
  workdir, export, _ = models
  tokenizer = load_tokenizer(os.path.join(workdir, 'tokenizer'))
  imported = transformers.GenerationConfig.from_pretrained(os.path.join(workdir, '..', 'hf'))
  assert _stop_ids(export) == sorted({tokenizer.eos_id, imported.eos_token_id})
  assert EuroLM(workdir, batch_size=2).stop_ids == _stop_ids(export)
  chat_run = str(tmp_path / 'chat_run')
  shutil.copytree(workdir, chat_run)
  with open(os.path.join(chat_run, 'chat_template.jinja'), 'w', encoding='utf-8') as f:
    f.write(LLAMA3)
  hf.export_hf(chat_run, str(tmp_path / 'chat_export'), dtype='float32', log=lambda *_: None)
  stops = _stop_ids(tmp_path / 'chat_export')
  eot = tokenizer.encode('<|eot_id|>')[0]
  assert stops == sorted({tokenizer.eos_id, eot, imported.eos_token_id})
  assert EuroLM(chat_run, batch_size=2).stop_ids == stops


def test_cli_runs_local_tasks_and_writes_results(models, tmp_path):
  workdir, _, tasks_dir = models
  output = tmp_path / 'results.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'euro_lm.harness',
          f'--workdir={workdir}',
          '--tasks=euro_choice,euro_generate',
          f'--include_path={tasks_dir}',
          f'--max_length={MAX_LENGTH}',
          '--batch_size=4',
          f'--output={output}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads(output.read_text())
  assert set(written['results']) == {'euro_choice', 'euro_generate'}
  assert 'acc,none' in written['results']['euro_choice']
  assert 'euro_choice' in result.stdout


def test_tasks_inside_training_equal_the_saved_checkpoints(models, task_manager, tmp_path):
  """train.harness_tasks: lm-eval on the training params at steps 1 and 2, into
  metrics.jsonl; step 2's numbers equal EuroLM on the step-2 checkpoint."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from euro_lm.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from euro_lm.train.loop import train  # pylint: disable=g-import-not-at-top

  tasks_dir = models[2]  # the task files of task_manager
  config = tiny.get_config()
  config.update_from_flattened_dict(
      {
          'model.num_layers': 1,
          'model.vocab_size': 1024,
          'model.embed_dim': 64,
          'model.mlp_dim': 128,
          'data.languages': 'en,de',
          'train.steps': 2,
          'train.global_batch_size': 8,
          'train.seq_len': 32,
          'train.eval_every': 0,
          'train.checkpoint_every': 2,
          'train.harness_tasks': 'euro_choice',
          'train.harness_every': 1,
          'train.harness_include_path': str(tasks_dir),
          'optimizer.warmup_steps': 1,
      }
  )
  workdir = tmp_path / 'run'
  train(config, str(workdir))
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  harness = {r['step']: r for r in records if 'harness/euro_choice/acc' in r}
  assert sorted(harness) == [1, 2]
  saved = evaluate(EuroLM(str(workdir), batch_size=8), task_manager)
  assert harness[2]['harness/euro_choice/acc'] == saved['results']['euro_choice']['acc,none']
  config.train.harness_tasks = 'no_such_task'
  with pytest.raises(ConfigError, match='train.harness_tasks: unknown lm-eval task'):
    train(config, str(tmp_path / 'other'))
