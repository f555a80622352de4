"""Per-language loss, perplexity and bits per byte of a checkpoint on held-out text.

The numbers are the in-training validation's (`train.loop` calls `language_scores` too):
documents are packed by `pipeline.make_eval_batches` exactly as validation packs them,
scored by the same jitted `eval_step` sharded over the run's mesh, and summed in float64
on the host. Bits per byte divide by the UTF-8 bytes the target tokens decode to, so
tokenizers with different vocabularies compare on equal terms.

For a parallel set (the same texts in every language) `relative_to(pivot)` adds, per
language, the total information the model needs for the text against the pivot's:
how much more it pays to say the same thing in that language.
"""

import json
import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from euro_lm import devices
from euro_lm.config import validate
from euro_lm.data import pipeline
from euro_lm.data.languages import resolve_language
from euro_lm.errors import ConfigError, UserError
from euro_lm.evaluation.texts import HeldOut, read_held_out
from euro_lm.inference import load_config, load_run
from euro_lm.sharding import global_batch, logical_rules, make_mesh
from euro_lm.train.step import make_eval_step


def language_totals(eval_step, params, batches, mesh, rules) -> dict[str, float]:
  """`loss_sum` (nats), `tokens` and `bytes` summed over one language's batches."""
  totals = {'loss_sum': 0.0, 'tokens': 0.0, 'bytes': 0.0}
  for batch in batches:
    sums = jax.device_get(eval_step(params, global_batch(batch, mesh, rules)))
    for k, v in sums.items():
      totals[k] += float(v)
  return totals


def scores(totals: dict[str, float]) -> dict[str, float]:
  """loss (nats per target token), perplexity and bpb (bits per UTF-8 byte) from sums."""
  loss = totals['loss_sum'] / max(totals['tokens'], 1.0)
  result = {'loss': loss, 'perplexity': math.exp(min(loss, 700.0))}  # no float overflow
  if totals.get('bytes'):
    result['bpb'] = totals['loss_sum'] / math.log(2) / totals['bytes']
  return result


def language_scores(eval_step, params, valid, mesh, rules):
  """The in-training validation record: `valid/<lang>/{loss,perplexity,bpb}` per language
  and the means of loss and bpb over languages (`valid/loss`, `valid/bpb`)."""
  results = {}
  for language, batches in valid.items():
    for k, v in scores(language_totals(eval_step, params, batches, mesh, rules)).items():
      results[f'valid/{language}/{k}'] = v
  for metric in ('loss', 'bpb'):
    values = [v for k, v in results.items() if k.endswith('/' + metric)]
    if values:
      results[f'valid/{metric}'] = float(np.mean(values))
  return results


def relative_to(languages: dict[str, dict], pivot: str, documents: dict[str, list[str]]):
  """Adds `relative_to_pivot` to each language's scores: its total nats on the set over the
  pivot's. Refuses a set that is not parallel (different document counts)."""
  if pivot not in languages:
    raise UserError(f'--pivot={pivot}: not among the languages read ({", ".join(languages)})')
  counts = {tag: len(docs) for tag, docs in documents.items()}
  if len(set(counts.values())) > 1:
    raise UserError(
        'a parallel set needs the same documents in every language; got '
        + ', '.join(f'{tag}: {n}' for tag, n in counts.items())
    )
  for scores_ in languages.values():
    scores_['relative_to_pivot'] = scores_['loss_sum'] / languages[pivot]['loss_sum']


def evaluate(
    run,
    held_out: HeldOut,
    *,
    eval_step,
    mesh,
    rules,
    batch_size: int,
    seq_len: int,
    max_batches: int = 0,
    pivot: str = '',
    log: Callable[[str], None] = print,
) -> dict:
  """Scores `run` (an `inference.Run` with sharded params) on `held_out`; returns the
  result that `python -m euro_lm.evaluate` writes as JSON."""
  process_count = jax.process_count()
  config = run.config
  per_language = {}
  packing = scoring = 0.0
  for language, docs in held_out.documents.items():
    started = time.perf_counter()
    batches = pipeline.make_eval_batches(
        docs,
        run.tokenizer,
        seq_len=seq_len,
        batch_size=batch_size // process_count,
        max_batches=max_batches,
        process_index=jax.process_index(),
        process_count=process_count,
        add_bos=config.data.add_bos,
        add_eos=config.data.add_eos,
    )
    packed = time.perf_counter()
    totals = language_totals(eval_step, run.params, batches, mesh, rules)
    packing, scoring = packing + packed - started, scoring + time.perf_counter() - packed
    per_language[language] = {
        'documents': len(docs),
        'tokens': int(totals['tokens']),
        'bytes': int(totals['bytes']),
        'loss_sum': totals['loss_sum'],
        **scores(totals),
    }
    log(f'{language}: {len(docs)} documents, {int(totals["tokens"])} tokens')
  if pivot:
    relative_to(per_language, pivot, held_out.documents)
  tokens = sum(s['tokens'] for s in per_language.values())
  return {
      'workdir': os.path.dirname(os.path.dirname(run.step_dir)),
      'step': int(os.path.basename(run.step_dir)),
      'checkpoint': run.step_dir,
      'tokenizer': run.tokenizer.path,
      'inputs': held_out.files,
      'seq_len': seq_len,
      'batch_size': batch_size,
      'max_batches': max_batches,
      'add_bos': bool(config.data.add_bos),
      'add_eos': bool(config.data.add_eos),
      'pivot': pivot or None,
      'languages': per_language,
      'mean': {
          metric: float(np.mean([s[metric] for s in per_language.values()]))
          for metric in ('loss', 'bpb')
          if all(metric in s for s in per_language.values())
      },
      **held_out.report_json(),
      'seconds': {'packing': packing, 'scoring': scoring},
      'tokens_per_second': tokens / (packing + scoring),
  }


def evaluate_workdir(
    workdir,
    inputs,
    source,
    *,
    step=None,
    output='',
    pivot='',
    batch_size=0,
    seq_len=0,
    max_batches=0,
    overrides=(),
    log=print,
):
  """Loads the run sharded over its mesh, scores `inputs`, prints the table, writes JSON."""
  config = load_config(workdir, overrides)
  if batch_size:
    config.train.global_batch_size = batch_size
  if seq_len:
    config.train.seq_len = seq_len
  if pivot:
    try:
      pivot = resolve_language(pivot)
    except ValueError as e:
      raise ConfigError(f'--pivot={pivot}: {e}') from None
  validate(config, jax.device_count(), jax.process_count(), devices.describe())
  mesh, rules = make_mesh(config.mesh), logical_rules(config.mesh)
  data = read_held_out(inputs, source)
  run = load_run(workdir, step, config=config, mesh=mesh, rules=rules)
  result = evaluate(
      run,
      data,
      eval_step=make_eval_step(run.model, mesh, run.shardings),
      mesh=mesh,
      rules=rules,
      batch_size=config.train.global_batch_size,
      seq_len=config.train.seq_len,
      max_batches=max_batches,
      pivot=pivot,
      log=log,
  )
  log(f'# {run.step_dir}')
  log(format_table(result))
  for warning in data.warnings:
    log(f'warning: {warning}')
  if output and jax.process_index() == 0:
    tmp = output + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, output)
    log(f'wrote {output}')
  return result


def format_table(result: dict) -> str:
  """The result as a fixed-width table, one row per language and a mean row."""
  relative = result['pivot'] is not None
  header = f'{"language":<12} {"documents":>9} {"tokens":>10} {"loss":>8} {"ppl":>10} {"bpb":>7}'
  header += f' {"vs " + result["pivot"]:>14}' if relative else ''
  lines = [header]
  for language, s in result['languages'].items():
    line = (
        f'{language:<12} {s["documents"]:>9} {s["tokens"]:>10} {s["loss"]:>8.4f} '
        f'{s["perplexity"]:>10.2f} {s.get("bpb", float("nan")):>7.4f}'
    )
    line += f' {s["relative_to_pivot"]:>13.3f}x' if relative else ''
    lines.append(line)
  mean = result['mean']
  lines.append(
      f'{"mean":<12} {"":>9} {"":>10} {mean.get("loss", float("nan")):>8.4f} {"":>10} '
      f'{mean.get("bpb", float("nan")):>7.4f}'
  )
  return '\n'.join(lines)
