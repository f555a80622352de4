"""lm-evaluation-harness on euro_lm's JAX model: any lm-eval task on a checkpoint, no export.

`EuroLM` implements lm-eval's model interface (`loglikelihood`, `loglikelihood_rolling`,
`generate_until`) over a run's checkpoint, sharded over the run's mesh. Requests are scored
in fixed-size batches padded to a few bucketed lengths (one compiled step per bucket) and
generation uses euro_lm's KV-cache sampler.

Tokenization follows lm-eval's own Hugging Face model (`lm_eval --model hf`) exactly, so
that a checkpoint and its float32 export give the same numbers: `add_bos_token` None uses
the tokenizer's default (BOS for the tokenizers euro_lm trains, Llama 3 and Gemma), True
or False forces it, and a text that already starts with the prefix token's text
(`<|begin_of_text|>`, `<s>`; EOS's for a tokenizer without BOS) gets none added.
Generation stops where the export's does (euro_lm.data.chat.stop_ids): at EOS, at an
imported base model's stop ids and, for a run fine-tuned on conversations, at its
template's end of turn. An
empty context is the BOS token (lm-eval's `prefix_token_id`), and rolling windows start
with it too: a rolling task with BOS added by the tokenizer counts BOS twice, in lm-eval's
hf model as here, which costs a model trained with one BOS per document several nats per
document; pass `add_bos_token=False` for rolling (perplexity) tasks.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from euro_lm import devices, records
from euro_lm.config import validate
from euro_lm.data import chat
from euro_lm.data.dataset import chat_template_of_run
from euro_lm.errors import ConfigError
from euro_lm.hf.export import declared_positions
from euro_lm.inference import load_config, load_run
from euro_lm.sampling import generate
from euro_lm.sharding import (
    batch_mesh_axes,
    batch_sharding,
    logical_rules,
    make_mesh,
    mesh_axes_size,
    replicated,
)

# Row lengths are rounded up to a power of two from this, so a task compiles a few steps.
_MIN_BUCKET = 16


def _bucket(length, limit):
  return min(max(_MIN_BUCKET, 1 << (length - 1).bit_length()), limit)


def _check_device(device):
  """Refuses an lm-eval device of another platform than the one JAX runs on."""
  if device is None:
    return
  platform = str(device).split(':')[0].lower()
  platform = {'cuda': 'gpu', 'rocm': 'gpu'}.get(platform, platform)
  if platform != jax.default_backend():
    raise ConfigError(
        f'device={device}: JAX runs on {jax.default_backend()} here and places the model on '
        "the run's mesh; choose the platform with JAX_PLATFORMS"
    )


@register_model('euro_lm')
class EuroLM(TemplateLM):
  """A euro_lm run's checkpoint as an lm-eval model.

  Args:
    workdir: a training or import workdir.
    step: the checkpoint step; None: the newest.
    batch_size: rows per scoring step over all devices (rounded up to the batch mesh);
      'auto' (lm-eval's, also 'auto:N'): the run's train.global_batch_size, which its rows
      of train.seq_len fit in training; `max_batch_size` caps it.
    max_length: the longest row; 0: what an export declares as max_position_embeddings,
      which lm-eval's hf model reads (the run's train.seq_len, or an imported base
      model's context if longer; euro_lm.hf.export.declared_positions).
    max_gen_toks: default most new tokens for generation tasks.
    add_bos_token: None (the tokenizer's default), True or False; see the module doc.
    overrides: 'section.field=value' changes to the run's config (inference.load_config).
    run, mesh, rules: instead of `workdir`, a loaded run (`inference.Run`: config, model,
      params sharded over `mesh` by `rules`, tokenizer), such as the training state's;
      `workdir` then only names its directory (for the chat template it fine-tunes with).
    device: lm-eval's device argument. JAX places the model on the run's mesh; a device
      of another platform than JAX's is refused (JAX_PLATFORMS chooses it).
  """

  def __init__(
      self,
      workdir=None,
      step=None,
      batch_size=8,
      max_length=0,
      max_gen_toks=256,
      add_bos_token=None,
      overrides=(),
      *,
      run=None,
      mesh=None,
      rules=None,
      device=None,
      max_batch_size=None,
  ):
    super().__init__()
    _check_device(device)
    if run is None:  # from a workdir's checkpoint; else a loaded `inference.Run` on `mesh`
      config = load_config(workdir, overrides)
      validate(config, jax.device_count(), jax.process_count(), devices.describe())
      mesh, rules = make_mesh(config.mesh), logical_rules(config.mesh)
      run = load_run(workdir, step, config=config, mesh=mesh, rules=rules)
    config = run.config
    self.mesh, self.rules, self.run = mesh, rules, run
    self.tokenizer = None  # lm-eval reads chat templates from an HF tokenizer; none here
    self._tok = self.run.tokenizer
    if str(batch_size).startswith('auto'):
      batch_size = config.train.global_batch_size
    if max_batch_size:
      batch_size = min(int(batch_size), int(max_batch_size))
    ways = mesh_axes_size(self.mesh, batch_mesh_axes(self.rules))
    self._batch_size = -(-int(batch_size) // ways) * ways
    if run.step_dir:
      base = records.base_model_at(run.step_dir)
    else:  # the training state's: what it started from
      base = records.base_model_of(config.train.init_from)
    self._max_length = int(max_length) or declared_positions(config.train.seq_len, base)
    self._max_gen_toks = int(max_gen_toks)
    if isinstance(add_bos_token, str):  # from lm-eval's --model_args
      add_bos_token = {'true': True, 'false': False, 'none': None}[add_bos_token.lower()]
    self.add_bos_token = add_bos_token
    if self._tok.bos_id is None and self._tok.eos_id is None:
      raise ConfigError(f'the tokenizer {self._tok.path} has neither BOS nor EOS to start with')
    # The prefix token as text, special tokens kept (lm-eval decodes it so).
    prefix = 'bos_token' if self._tok.bos_id is not None else 'eos_token'
    self._prefix_text = self._tok.special_tokens.get(prefix, '')
    run_dir = workdir or (os.path.dirname(os.path.dirname(run.step_dir)) if run.step_dir else '')
    template = chat_template_of_run(run_dir) if run_dir else None
    self._stop_ids = chat.stop_ids(self._tok.eos_id, self._tok, template, base)
    self.score_rows = self._make_score()

  def _make_score(self):
    model, rows = self.run.model, batch_sharding(self.mesh, self.rules)

    def score(params, inputs_BL, targets_BL, segment_ids_BL, positions_BL):
      logits_BLV = model.apply({'params': params}, inputs_BL, segment_ids_BL, positions_BL)
      logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
      target_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
      return target_BL, jnp.argmax(logp_BLV, axis=-1) == targets_BL

    return jax.jit(
        score,
        in_shardings=(self.run.shardings, rows, rows, rows, rows),
        out_shardings=replicated(self.mesh),
    )

  # What lm-eval reads of a model.
  @property
  def eot_token_id(self):
    return self._tok.eos_id if self._tok.eos_id is not None else self._tok.bos_id

  @property
  def stop_ids(self):
    """The ids that end a generation (EOS, and a chat fine-tuned run's end of turn)."""
    return self._stop_ids

  @property
  def prefix_token_id(self):
    return self._tok.bos_id if self._tok.bos_id is not None else self._tok.eos_id

  @property
  def max_length(self):
    return self._max_length

  @property
  def max_gen_toks(self):
    return self._max_gen_toks

  @property
  def batch_size(self):
    return self._batch_size

  def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
    """lm-eval's hf model's encoding. Its tokenizer adds BOS as `add_bos_token` says, else
    by its default; `add_special_tokens=False` adds none, and so does None before a text
    that starts with the prefix token's text."""
    del kwargs
    add = self.add_bos_token if self.add_bos_token is not None else self._tok.adds_bos
    if add_special_tokens is False:
      add = False
    elif add_special_tokens is None and self._prefix_text and string.startswith(self._prefix_text):
      add = False
    # encode_offsets: control pieces' text (`<s>`) as their ids, as the export's tokenizer
    # has them; the same ids as encode() for a tokenizer.json.
    ids = ([self._tok.bos_id] if add and self._tok.bos_id is not None else []) + list(
        self._tok.encode_offsets(string)[0]
    )
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens=True):
    del skip_special_tokens  # euro_lm's tokenizers always leave special tokens out
    return self._tok.decode(tokens)

  def _put(self, array_BL):
    """A host array every process holds whole, as a global array sharded by rows."""
    sharding = batch_sharding(self.mesh, self.rules)
    return jax.make_array_from_callback(array_BL.shape, sharding, lambda index: array_BL[index])

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    """(sum of the continuation's log-probabilities, whether it is the greedy path) per
    `(key, context ids, continuation ids)`, truncated from the left to max_length + 1."""
    del disable_tqdm, kwargs
    rows = []
    for index, (_, context, continuation) in enumerate(requests):
      if not context or not continuation:
        raise ValueError('lm-eval sent an empty context or continuation')
      if len(continuation) > self._max_length:  # lm-eval's hf model refuses it too
        raise ConfigError(
            f'a continuation of {len(continuation)} tokens is longer than '
            f'max_length={self._max_length}: it cannot be scored whole; raise max_length'
        )
      tokens = (list(context) + list(continuation))[-(self._max_length + 1) :]
      rows.append((index, tokens, len(continuation)))
    rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a bucket
    results = [None] * len(requests)
    pad = max(self._tok.pad_id, 0)
    for start in range(0, len(rows), self._batch_size):
      chunk = rows[start : start + self._batch_size]
      length = _bucket(len(chunk[0][1]) - 1, self._max_length)
      shape = (self._batch_size, length)
      inputs, targets = np.full(shape, pad, np.int32), np.full(shape, pad, np.int32)
      segments = np.zeros(shape, np.int32)
      for b, (_, tokens, _) in enumerate(chunk):
        n = len(tokens) - 1
        inputs[b, :n], targets[b, :n], segments[b, :n] = tokens[:-1], tokens[1:], 1
      positions = np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy()
      logp_BL, greedy_BL = jax.device_get(
          self.score_rows(
              self.run.params,
              self._put(inputs),
              self._put(targets),
              self._put(segments),
              self._put(positions),
          )
      )
      for b, (index, tokens, continuation_length) in enumerate(chunk):
        n = len(tokens) - 1
        scored = slice(n - continuation_length, n)
        answer = (
            float(np.sum(logp_BL[b, scored], dtype=np.float64)),
            bool(greedy_BL[b, scored].all()),
        )
        results[index] = answer
        key = requests[index][0]
        if key is not None:
          self.cache_hook.add_partial('loglikelihood', key, answer)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """Each text's log-likelihood over disjoint windows of max_length tokens, the first
    conditioned on the prefix token, as lm-eval's hf model scores perplexity tasks."""
    windows, owners = [], []
    for owner, (string,) in enumerate(req.args for req in requests):
      for context, continuation in map(
          make_disjoint_window,
          get_rolling_token_windows(
              token_list=self.tok_encode(string),
              prefix_token=self.prefix_token_id,
              max_seq_len=self._max_length,
              context_len=1,
          ),
      ):
        windows.append((None, context, continuation))
        owners.append(owner)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[owner] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm=False):
    """Greedy (or sampled, as the task asks) continuations with the KV cache, cut at the
    first stop sequence, as lm-eval's hf model returns them."""
    groups = {}
    for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(
          (index, context, gen_kwargs)
      )
    results = [None] * len(requests)
    pad = max(self._tok.pad_id, 0)
    for group in groups.values():
      kwargs = normalize_gen_kwargs(dict(group[0][2]), self._max_gen_toks)
      until = handle_stop_sequences(kwargs.pop('until', None), eos=None)
      max_new = int(kwargs.pop('max_gen_toks'))
      if max_new >= self._max_length:
        raise ConfigError(f'max_gen_toks={max_new} leaves no room in max_length={self._max_length}')
      temperature = float(kwargs.get('temperature', 0.0)) if kwargs.get('do_sample') else 0.0
      encoded = [
          (index, self.tok_encode(context, left_truncate_len=self._max_length - max_new))
          for index, context, _ in group
      ]
      encoded.sort(key=lambda r: -len(r[1]))
      for start in range(0, len(encoded), self._batch_size):
        chunk = encoded[start : start + self._batch_size]
        length = _bucket(len(chunk[0][1]), self._max_length - max_new)
        tokens_BP = np.full((self._batch_size, length), pad, np.int32)
        lengths_B = np.ones(self._batch_size, np.int32)  # filler rows: one pad token
        for b, (_, ids) in enumerate(chunk):
          tokens_BP[b, length - len(ids) :], lengths_B[b] = ids, len(ids)
        out = generate(
            self.run.model,
            self.run.params,
            tokens_BP,
            lengths_B,
            jax.random.key(int(kwargs.get('seed', 0) or 0)),
            max_new_tokens=max_new,
            eos_id=self._stop_ids,
            pad_id=pad,
            temperature=temperature,
            top_k=int(kwargs.get('top_k', 0) or 0),
            top_p=float(kwargs.get('top_p', 1.0) or 1.0),
            num_tokens=self._tok.vocab_size,
        )
        new_BN, new_lengths_B = jax.device_get((out.tokens_BN, out.lengths_B))
        for b, (index, _) in enumerate(chunk):
          ids = [int(t) for t in new_BN[b, : new_lengths_B[b]] if t not in self._stop_ids]
          text = postprocess_generated_text(self.tok_decode(ids), until, None)
          results[index] = text
          self.cache_hook.add_partial('generate_until', requests[index].args, text)
    return results


def run_tasks(
    workdir,
    tasks,
    *,
    include_path='',
    step=None,
    num_fewshot=None,
    limit=None,
    batch_size=8,
    max_length=0,
    add_bos_token=None,
    overrides=(),
    output='',
    log=print,
):
  """Runs lm-eval `tasks` (names, or groups) on a checkpoint; prints lm-eval's table and
  writes the results (scores, task configs, versions) to `output` as JSON."""
  from lm_eval import simple_evaluate  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  from lm_eval.utils import handle_non_serializable, make_table  # pylint: disable=import-outside-toplevel

  task_manager = TaskManager(include_path=include_path or None)
  unknown = [t for t in tasks if t not in task_manager.all_tasks]
  if unknown:
    where = f' or in {include_path}' if include_path else ' (add --include_path for your own)'
    raise ConfigError(f'unknown lm-eval task(s) {", ".join(unknown)}: not in lm-eval{where}')
  model = EuroLM(
      workdir,
      step=step,
      batch_size=batch_size,
      max_length=max_length,
      add_bos_token=add_bos_token,
      overrides=overrides,
  )
  results = simple_evaluate(
      model=model,
      tasks=list(tasks),
      num_fewshot=num_fewshot,
      limit=limit,
      task_manager=task_manager,
  )
  if jax.process_index() == 0:
    log(f'# {model.run.step_dir}')
    log(make_table(results))
    if output:
      record = {k: results[k] for k in ('results', 'versions', 'n-shot', 'configs') if k in results}
      record['checkpoint'] = model.run.step_dir
      record['add_bos_token'] = add_bos_token
      tmp = output + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
      os.replace(tmp, output)
      log(f'wrote {output}')
  return results


def result_scalars(results, prefix='harness'):
  """`{prefix/<task>/<metric>: value}` of lm-eval's results, standard errors left out (a
  metric under a filter other than lm-eval's default is `<metric>_<filter>`)."""
  scalars = {}
  for task, metrics in results['results'].items():
    for key, value in metrics.items():
      metric, _, kind = key.partition(',')
      if not kind or metric.endswith('_stderr') or isinstance(value, (str, bool)):
        continue
      try:
        value = float(value)
      except (TypeError, ValueError):
        continue
      name = metric if kind == 'none' else f'{metric}_{kind}'
      scalars[f'{prefix}/{task}/{name}'] = value
  return scalars


class TrainingHarness:
  """lm-eval tasks on the training state's parameters (`train.harness_tasks`, every
  `train.harness_every` steps): one `EuroLM` for the run, its parameters swapped in."""

  def __init__(self, config, run, mesh, rules, workdir):
    from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

    t = config.train
    self.tasks = [name.strip() for name in t.harness_tasks.split(',') if name.strip()]
    self.task_manager = TaskManager(include_path=t.harness_include_path or None)
    unknown = [name for name in self.tasks if name not in self.task_manager.all_tasks]
    if unknown:
      raise ConfigError(
          f'train.harness_tasks: unknown lm-eval task(s) {", ".join(unknown)}'
          + (f' (not in lm-eval or {t.harness_include_path})' if t.harness_include_path else '')
      )
    self.limit = t.harness_limit or None
    self.model = EuroLM(workdir, batch_size=t.global_batch_size, run=run, mesh=mesh, rules=rules)

  def __call__(self, params):
    """The tasks' scalars on `params` (sharded as the run's)."""
    from lm_eval import simple_evaluate  # pylint: disable=import-outside-toplevel

    self.model.run = self.model.run._replace(params=params)
    results = simple_evaluate(
        model=self.model, tasks=self.tasks, limit=self.limit, task_manager=self.task_manager
    )
    return result_scalars(results)
