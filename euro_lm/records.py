"""A run's own records of what it trained on and with: saved with every checkpoint, and
read back as one report (what model cards, summaries and `python -m euro_lm.report` show).

Two checkpoint items hold them. `data` (the iterator state of every process) already
counts, per language, the tokens put in rows and the documents begun, across resumes and
process counts (euro_lm.data.streams.consumption). `records` (JSON, this module) adds
what the iterator does not know: each run segment's steps, tokens, FLOPs (the model's
count, as MFU uses), hardware and wall-clock time up to the save; the sources with their
provenance; each language's training-set size; and the base model. Time a run spent after
its last checkpoint is not in any checkpoint, so it is not counted.
"""

import datetime
import glob
import json
import os
import pathlib
import time

from euro_lm import provenance
from euro_lm.checkpoint import resolve_checkpoint
from euro_lm.config import base_config
from euro_lm.data import corpus, languages, mixture, prepared
from euro_lm.data.streams import REPLAY_PREFIX, consumption, stream_language, stream_source
from euro_lm.model import param_count, train_flops_per_token
from euro_lm.results import metrics_path, read_metrics, record_kind

ITEM = 'records'  # the checkpoint item (JSON, written by process 0)
VERSION = 1


def read_records(step_dir) -> dict | None:
  """The records saved with a checkpoint step, or None (an imported or older checkpoint)."""
  path = os.path.join(str(step_dir), ITEM, 'metadata')
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _saved_config(step_dir) -> dict:
  for path in (
      os.path.join(str(step_dir), 'config', 'metadata'),
      os.path.join(os.path.dirname(os.path.dirname(str(step_dir))), 'config.json'),
  ):
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        return json.load(f)
  return {}


def base_model_of(init_from: str) -> dict | None:
  """The model a run's parameters started from (`train.init_from`): an imported HF
  model's own record (euro_lm.provenance.BASE_MODEL_FILE), the base model a euro_lm run
  started from itself, else that run (its name unknown); None without init_from."""
  if not init_from:
    return None
  step_dir = resolve_checkpoint(init_from)
  workdir = os.path.dirname(os.path.dirname(str(step_dir)))
  imported = _imported(workdir)
  if imported:
    return imported
  inherited = (read_records(step_dir) or {}).get('base_model')
  if inherited:
    return inherited
  return {'name': None, 'license': None, 'path': workdir}


def base_model_at(step_dir) -> dict | None:
  """The base model of a checkpoint: its records', else (an imported model's step 0) its
  workdir's own record; None for a model trained from scratch."""
  records = read_records(step_dir)
  if records:
    return records.get('base_model')
  return _imported(os.path.dirname(os.path.dirname(str(step_dir))))


def _imported(workdir):
  """An imported model's own record (its workdir's BASE_MODEL_FILE), else None."""
  path = os.path.join(workdir, provenance.BASE_MODEL_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _corpus_source(d) -> dict:
  """The provenance record of data.corpus, with the manifest's `size` for prepared data."""
  if d.corpus != 'prepared':
    return dict(corpus.embedded_source(), size=None)
  manifest = prepared.read_manifest(d.prepared_dir)
  name = f'prepared:{os.path.basename(os.path.normpath(d.prepared_dir))}'
  record = manifest.get('source') or provenance.undescribed(name)
  size = {
      tag: {k: entry[k] for k in ('documents', 'tokens', 'bytes')}
      for tag, entry in manifest['languages'].items()
  }
  return dict(record, size=size)


def _conversation_source(name, entries, d) -> dict:
  """The provenance record of one conversation source of data.chat_files: what prepare_data
  --chat recorded in its prepared directories, else data.chat_source, else undescribed."""
  recorded = [
      prepared.read_manifest(e).get('source')
      for e in entries
      if os.path.isfile(os.path.join(e, prepared.MANIFEST))
  ]
  if recorded and len(recorded) == len(entries) and all(recorded):
    if len({json.dumps(r, sort_keys=True) for r in recorded}) == 1:
      return dict(recorded[0], size=None)
  if d.chat_source:
    record = provenance.read_source_file(d.chat_source)
    if name:  # one description for several named sources: each keeps its own name
      record = dict(record, source_name=f'{record["source_name"]}: {name}')
    return dict(record, size=None)
  label = name or d.chat_files
  return dict(provenance.undescribed(f'conversations:{label}', 'conversations'), size=None)


def run_sources(config) -> tuple[dict, dict]:
  """({source name: provenance record, with `size` where a manifest gives it},
  {conversation source ('' unnamed), or the replay prefix: source name}) of the data a
  config trains on: the conversations (data.chat_files, each named source described by its
  prepared manifest or data.chat_source) and what they replay, else data.corpus."""
  d = config.data
  if not d.chat_files:
    text = _corpus_source(d)
    return {text['source_name']: text}, {'': text['source_name']}
  sources, by_source = {}, {}
  for name, entries in mixture.parse_sources(d.chat_files, field='data.chat_files').items():
    record = _conversation_source(name, entries, d)
    sources[record['source_name']] = record
    by_source[name] = record['source_name']
  if d.replay_fraction:
    text = _corpus_source(d)
    sources[text['source_name']] = text
    by_source[REPLAY_PREFIX] = text['source_name']
  return sources, by_source


def _source_of(stream, by_source):
  if stream.startswith(REPLAY_PREFIX):
    return by_source[REPLAY_PREFIX]
  return by_source[stream_source(stream)]


class RunRecords:
  """The records of a run segment on top of those it resumed (`previous`); `at(step)` is
  what to save with checkpoint `step`."""

  def __init__(self, previous, config, sizes, *, start_step, devices, processes, started):
    import jax  # pylint: disable=import-outside-toplevel

    t = config.train
    sources, by_source = run_sources(config)
    previous = previous or {
        'version': VERSION,
        'recorded_from_step': start_step,  # > 0: resumed from a checkpoint without records
        'segments': [],
        'sources': {},
        'language_sources': {},
        'sizes': {},
        'base_model': base_model_of(t.init_from),
        'init_from': os.path.abspath(t.init_from) if t.init_from else None,
    }
    self._records = json.loads(json.dumps(previous))
    self._records['sources'].update(sources)
    self._records['language_sources'].update({tag: _source_of(tag, by_source) for tag in sizes})
    self._records['sizes'].update(sizes)
    device = devices[0]
    tokens_per_step = t.global_batch_size * t.seq_len
    self._segment = {
        'from_step': start_step,
        'started': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'platform': device.platform,
        'device_kind': device.device_kind,
        'devices': len(devices),
        'processes': processes,
        'jax': jax.__version__,
        'tokens_per_step': tokens_per_step,
        'flops_per_token': train_flops_per_token(config.model, t.seq_len),
    }
    self._started = started

  def at(self, step: int) -> dict:
    seconds = time.perf_counter() - self._started
    steps = step - self._segment['from_step']
    tokens = steps * self._segment['tokens_per_step']
    segment = dict(
        self._segment,
        to_step=step,
        seconds=seconds,
        tokens=tokens,
        flops=tokens * self._segment['flops_per_token'],
    )
    return {**self._records, 'segments': [*self._records['segments'], segment]}


def _evaluation(workdir, step):
  """The validation and lm-eval results logged at `step` or the newest before it: {'step':
  s, metric: value}, or None when metrics.jsonl has none."""
  if not os.path.isfile(metrics_path(workdir)):
    return None
  metrics = read_metrics(workdir)
  found = {}
  for record in metrics:
    if record['step'] > step:
      break
    kind = record_kind(record)
    scores = {k: v for k, v in record.items() if k.startswith(('valid/', 'harness/'))}
    if kind in ('eval', 'other') and scores:
      group = 'valid' if kind == 'eval' else 'harness'
      found[group] = {'step': record['step'], **scores}
  return found or None


def report(workdir: str, step: int | None = None) -> dict:
  """Everything the records of a checkpoint (the newest, or `step`) say, as one JSON-able
  dict: the model, the training (steps, tokens, FLOPs, hardware, device-hours), what was
  drawn per language and per source, the sources' provenance, the base model and the
  evaluation results logged up to that step."""
  step_dir = resolve_checkpoint(workdir, step)
  step = int(step_dir.name) if step_dir.name.isdigit() else 0
  workdir = os.path.dirname(os.path.dirname(str(step_dir)))
  config = _saved_config(step_dir)
  model = base_config().model
  model.update(config.get('model', {}))
  records = read_records(step_dir) or {}
  states = [
      pathlib.Path(p).read_bytes()
      for p in sorted(glob.glob(os.path.join(str(step_dir), 'data', 'process_*-of-*.json')))
  ]
  drawn = consumption(states)
  by_source = records.get('language_sources', {})
  sizes = records.get('sizes', {})
  segments = records.get('segments', [])
  by_language = {}
  nothing = {'tokens': 0, 'documents': 0, 'training_documents': None}
  # Every language the run trains on, drawn from yet or not (tokens 0).
  for tag in sorted(set(drawn) | set(sizes)):
    entry = drawn.get(tag, nothing)
    size = sizes.get(tag, {})
    documents = size.get('documents') or entry['training_documents']
    by_language[tag] = {
        'tokens': entry['tokens'],
        'documents': entry['documents'],
        'epochs': entry['documents'] / documents if documents else None,
        'source': by_source.get(tag),
        'training_documents': documents,
        'training_tokens': size.get('tokens'),
    }
  sources = {}
  for name, record in records.get('sources', {}).items():
    tags = sorted(t for t, s in by_source.items() if s == name)
    sources[name] = {
        **record,
        'languages': sorted({stream_language(t) for t in tags}),
        'tokens_trained': sum(by_language.get(t, {}).get('tokens', 0) for t in tags),
        'epochs': {t: by_language[t]['epochs'] for t in tags if t in by_language},
    }
  hardware = {}
  for segment in segments:
    key = (segment['device_kind'], segment['devices'], segment['platform'])
    entry = hardware.setdefault(
        key,
        {
            'device_kind': segment['device_kind'],
            'platform': segment['platform'],
            'devices': segment['devices'],
            'steps': 0,
            'device_hours': 0.0,
        },
    )
    entry['steps'] += segment['to_step'] - segment['from_step']
    entry['device_hours'] += segment['seconds'] * segment['devices'] / 3600
  t = config.get('train', {})
  # Totals over the segments hold only where the records go back to step 0.
  complete = bool(records) and not records.get('recorded_from_step')
  return {
      'checkpoint': str(step_dir),
      'step': step,
      'model': {
          'parameters': param_count(model),
          'layers': model.num_layers,
          'embed_dim': model.embed_dim,
          'vocab_size': model.vocab_size,
          'seq_len': t.get('seq_len'),
      },
      'training': {
          'steps': step,
          'recorded_from_step': records.get('recorded_from_step') if records else None,
          # Tokens of the documents drawn (exact, from the data state); `tokens` also counts
          # the padding of conversation rows: it is what the FLOPs are computed over.
          'content_tokens': sum(e['tokens'] for e in drawn.values()) if drawn else None,
          'tokens': sum(s['tokens'] for s in segments) if complete else None,
          'flops': sum(s['flops'] for s in segments) if complete else None,
          'device_hours': (sum(h['device_hours'] for h in hardware.values()) if complete else None),
          'hardware': list(hardware.values()),
          'segments': segments,
          'global_batch_size': t.get('global_batch_size'),
          'valid_fraction': config.get('data', {}).get('valid_fraction'),
      },
      'languages': by_language,
      'sources': sources,
      'base_model': base_model_at(step_dir),
      'init_from': records.get('init_from'),
      'evaluation': _evaluation(workdir, step),
  }


def language_code(tag: str) -> str | None:
  """The code a Hugging Face card lists for a language tag: ISO 639-1 where the language
  has one, else ISO 639-3; None for domains (code, math) and undetermined text."""
  tag = stream_language(tag)
  if tag in languages.DOMAINS or tag == 'und':
    return None
  for language in languages.LANGUAGES:
    if language.tag == tag:
      return language.iso639_1 or language.iso639_3
  return tag.split('_')[0]


def format_report(result: dict) -> str:
  """The report as text: totals, then one line per language and per source."""
  u = provenance.UNKNOWN
  tr = result['training']

  def known(value, fmt='{:,}'):
    return u if value is None else fmt.format(value)

  lines = [
      f'checkpoint {result["checkpoint"]} (step {result["step"]})',
      f'model: {result["model"]["parameters"]:,} parameters',
      f'trained: {result["step"]} steps, {known(tr["tokens"])} tokens in rows '
      f'({known(tr["content_tokens"])} of documents), '
      f'{known(tr["flops"], "{:.4g}")} FLOPs, {known(tr["device_hours"], "{:.4g}")} device-hours'
      + (f' (recorded from step {tr["recorded_from_step"]})' if tr['recorded_from_step'] else ''),
  ]
  for h in tr['hardware']:
    lines.append(
        f'  {h["devices"]} x {h["device_kind"]} ({h["platform"]}): {h["steps"]} steps, '
        f'{h["device_hours"]:.4g} device-hours'
    )
  base = result['base_model']
  if base:
    lines.append(
        f'base model: {base.get("name") or u} (licence {base.get("license") or u}; '
        f'{base.get("path")})'
    )
  lines.append(f'{"language":<20} {"tokens":>14} {"documents":>10} {"epochs":>8}  source')
  for tag, e in result['languages'].items():
    epochs = u if e['epochs'] is None else f'{e["epochs"]:.3f}'
    lines.append(
        f'{tag:<20} {e["tokens"]:>14,} {e["documents"]:>10,} {epochs:>8}  {e["source"] or u}'
    )
  for name, s in result['sources'].items():
    lines.append(f'source {name}: {s["tokens_trained"]:,} tokens trained')
    for field in provenance.FIELDS:
      if field != 'source_name':
        lines.append(f'  {field}: {s.get(field) or u}')
  evaluation = result['evaluation'] or {}
  for group in ('valid', 'harness'):
    if group in evaluation:
      scores = {k: v for k, v in evaluation[group].items() if k != 'step'}
      lines.append(
          f'{group} (step {evaluation[group]["step"]}): '
          + ' '.join(f'{k}={v:.4g}' for k, v in scores.items() if isinstance(v, (int, float)))
      )
  return '\n'.join(lines)
