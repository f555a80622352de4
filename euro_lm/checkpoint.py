"""Orbax checkpoints of the train state, the data position, the config and the tokenizer.

A step's checkpoint is `<workdir>/checkpoints/<step>/` with items
  state      params, optimizer state, step and skip counters (sharded arrays, OCDBT)
  data       each process's data iterator position (restorable onto another process count)
  config     the resolved config (JSON, human-readable)
  tokenizer  the files of the tokenizer the run trains with (the checkpoint stands alone)
  records    what the run trained on and with, up to this step (JSON; euro_lm.records)
  checksums.json  a digest of every file of those items (euro_lm.checksums), checked on restore
Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it only when every item
of every process is written, so a save cut short (SIGKILL, a node failure, a full disk)
leaves no step directory; it is ignored, and deleted when the next run opens the directory.
An old step is deleted by renaming it into `deleted/` (atomic) and emptying that folder, so
a deletion cut short leaves no half-deleted step behind.
"""

import concurrent.futures
import dataclasses
import glob
import json
import logging
import os
import shutil
import sys
import time
import warnings
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from euro_lm import checksums
from euro_lm.config import base_config
from euro_lm.data.tokenizer import (
    copy_files,
    copy_tokenizer,
    load_tokenizer,
    run_tokenizer,
    tokenizer_in,
)
from euro_lm.errors import UserError
from euro_lm.finite import leaf_name, nonfinite_leaves
from euro_lm.model import fp8

# Model fields that fix parameter shapes: a checkpoint resumes only under the same values.
SHAPE_FIELDS = (
    'vocab_size',
    'num_layers',
    'embed_dim',
    'num_heads',
    'num_kv_heads',
    'head_dim',
    'mlp_dim',
    'tie_embeddings',
    'qk_norm',
    'qkv_bias',
    'post_norms',
)
# With several processes a time-based save needs one agreed decision; asking every step
# would stall the host on the device each step, so they agree every this many steps.
_AGREE_EVERY_STEPS = 10
_DELETED = 'deleted'  # Orbax renames a step to delete into this folder; we empty it
CORRUPT_DIRECTORY = 'corrupt_checkpoints'  # in the workdir: corrupt steps set aside, kept
_STEP_METADATA = '_CHECKPOINT_METADATA'  # Orbax writes it before committing a step


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be written or read; the message says which and why."""


class SaveFailedError(CheckpointError):
  """An asynchronous save that failed; `step` is the step it was saving."""

  def __init__(self, message, step):
    super().__init__(message)
    self.step = step


class CorruptCheckpointError(CheckpointError):
  """A step whose files differ from its checksums; `intact_step` is the newest older step
  that is intact (or saved without checksums), None if there is none."""

  def __init__(self, message, step, intact_step):
    super().__init__(message)
    self.step, self.intact_step = step, intact_step


def first_line(error):
  """An Orbax or TensorStore error in one line, without the TensorStore spec it may dump."""
  text = str(error).strip().split('\n')[0]
  return text.split(' See full TensorStore details')[0].rstrip(' .:') or type(error).__name__


_QUIETED = []


def _quiet_duplicate_orbax_reports():
  """The Checkpointer reports a failed save or restore itself, as one line. Orbax also logs
  it at ERROR with tracebacks from its threads, asyncio logs its other failed writes, and
  the TensorStore reads a failed restore leaves behind raise 'Event loop is closed' or their
  own read error as they are collected: all of these are dropped."""
  if _QUIETED:
    return
  _QUIETED.append(True)
  orbax_root = os.path.dirname(os.path.dirname(ocp.__file__)) + os.sep
  logging.getLogger('absl').addFilter(
      lambda r: r.levelno < logging.ERROR or not r.pathname.startswith(orbax_root)
  )

  # Its write tasks that failed after the first failure, and the reads a failed restore
  # leaves behind: "Task exception was never retrieved", with a TensorStore spec.
  def storage_task_noise(record):
    text = record.getMessage()
    error = record.exc_info[1] if record.exc_info else None
    if error is not None:
      text += str(error)
      frame = error.__traceback__
      while frame is not None:  # raised in Orbax's code, whatever the message says
        if frame.tb_frame.f_code.co_filename.startswith(orbax_root):
          return True
        frame = frame.tb_next
    # A gathered write's error names only the OCDBT database it failed to write.
    return orbax_root in text or any(s in text.lower() for s in ('tensorstore', 'ocdbt'))

  logging.getLogger('asyncio').addFilter(lambda r: not storage_task_noise(r))
  previous = sys.unraisablehook

  def from_orbax(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)  # a read coroutine left unfinished
    return code is not None and code.co_filename.startswith(orbax_root)

  def hook(unraisable):
    value = unraisable.exc_value
    closed_loop = isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'
    if not (closed_loop or from_orbax(unraisable)):
      previous(unraisable)

  sys.unraisablehook = hook
  # The fragment writes a failed save never started are collected unawaited, often at exit,
  # where Python can only name the coroutine.
  warnings.filterwarnings(
      'ignore', r"coroutine '[\w.<>]*\.write_fragment' was never awaited", RuntimeWarning
  )


class DataStateHandler(grain.checkpoint.CheckpointHandler):
  """Grain's per-process iterator files, restored from all processes' files at once.

  Each process writes `process_<i>-of-<n>.json`. On restore every process reads all of
  them, so the iterator (euro_lm.data.streams.PackedStreams) can pick its own streams
  even when the process count changed since the save.
  """

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    files = sorted(directory.glob('process_*-of-*.json'))
    if not files:
      raise ValueError(f'no data iterator state in {directory}')
    item.set_state([f.read_text().encode() for f in files])
    return item


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


class TokenizerHandler(ocp.CheckpointHandler):
  """The tokenizer's files copied into the checkpoint (by process 0); restore returns the
  tokenizer loaded from that copy."""

  def save(self, directory, args):
    if jax.process_index() == 0:
      copy_files(args.tokenizer, str(directory))

  def restore(self, directory, args=None):
    return load_tokenizer(str(directory))


@ocp.args.register_with_handler(TokenizerHandler, for_save=True)
@dataclasses.dataclass
class TokenizerSave(ocp.args.CheckpointArgs):
  tokenizer: Any


@ocp.args.register_with_handler(TokenizerHandler, for_restore=True)
@dataclasses.dataclass
class TokenizerRestore(ocp.args.CheckpointArgs):
  pass


def _shapes(tree):
  """{leaf name: (shape, dtype)} of arrays, ShapeDtypeStructs or Orbax array metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {leaf_name(path): (tuple(x.shape), np.dtype(x.dtype).name) for path, x in leaves}


def shape_differences(saved, expected):
  """Lines naming leaves missing on either side or with other shapes/dtypes."""
  saved, expected = _shapes(saved), _shapes(expected)
  lines = [
      f'{name}: {saved[name][0]} {saved[name][1]} in the checkpoint, '
      f'{expected[name][0]} {expected[name][1]} in this run'
      for name in sorted(saved.keys() & expected.keys())
      if saved[name] != expected[name]
  ]
  lines += [f'{name}: only in the checkpoint' for name in sorted(saved.keys() - expected.keys())]
  lines += [
      f'{name}: missing from the checkpoint' for name in sorted(expected.keys() - saved.keys())
  ]
  return lines


def config_differences(saved_config, config):
  """'model.x: a in the checkpoint, b in this run' for each shape-fixing model field (a
  field the checkpoint's config predates counts as its default)."""
  saved_model = {**base_config().model.to_dict(), **saved_config.get('model', {})}
  return [
      f'model.{name}: {saved_model.get(name)!r} in the checkpoint, '
      f'{config.model[name]!r} in this run'
      for name in SHAPE_FIELDS
      if saved_model.get(name) != config.model[name]
  ]


def layer_chunk_axes(keypath, value):
  """`(0,)` for a leaf stacked over layers (under a 'layers' key), whose storage chunks are
  then one layer each, so one layer reads alone (export, inspection); `()` otherwise."""
  stacked = any(getattr(k, 'key', getattr(k, 'name', None)) == 'layers' for k in keypath)
  return (0,) if stacked and getattr(value, 'ndim', 0) >= 1 else ()


def _state_metadata(step_dir):
  """The saved state's tree of array metadata (shapes and dtypes), read without the arrays."""
  return ocp.PyTreeCheckpointHandler().metadata(step_dir / 'state').tree


def _half_deleted(step_dir):
  """A step that an older euro_lm stopped deleting: it lost Orbax's step metadata (which a
  committed step always has) and still holds another item of a training checkpoint, or
  has no state metadata left. An imported step (`state/` alone, complete) is not one."""
  if os.path.exists(os.path.join(step_dir, _STEP_METADATA)):
    return False
  others = ('config', 'data', 'tokenizer', checksums.FILE, 'commit_success.txt')
  return any(os.path.exists(os.path.join(step_dir, name)) for name in others) or not (
      os.path.exists(os.path.join(step_dir, 'state', '_METADATA'))
  )


def _free_space(path):
  try:
    free = shutil.disk_usage(path).free
  except OSError:
    return ''
  return (
      f'; {free / 2**30:.1f} GiB free there'
      if free >= 2**30
      else f'; {free / 2**20:.0f} MiB free there'
  )


class Checkpointer:
  """Asynchronous saves every `save_every` steps and/or `save_every_minutes`; keeps the
  newest `keep` checkpoints plus every `keep_every`-th step. `log` prints notes (a step
  restored unverified, a deletion finished); nothing by default."""

  def __init__(
      self, directory, *, save_every=0, save_every_minutes=0.0, keep=3, keep_every=0, log=None
  ):
    self.directory = os.path.abspath(directory)
    self._log = log or (lambda *a, **k: None)
    _quiet_duplicate_orbax_reports()
    policies = [preservation.LatestN(n=keep)]
    if keep_every:
      policies.append(preservation.EveryNSteps(interval_steps=keep_every))
    options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        todelete_subdir=_DELETED,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._record_checksums),
        preservation_policy=preservation.AnyPreservationPolicy(policies),
    )
    self._save_every = save_every
    self._save_seconds = save_every_minutes * 60
    self._last_save_time = time.monotonic()
    self._saving_step = None  # the step of the save that may still be in flight
    self._writing_step = None  # the step whose files the finalization callback digests
    try:
      if jax.process_index() == 0 and os.path.isdir(self.directory):
        self._finish_deletions()
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('euro_lm_checkpoint_open')
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise CheckpointError(f'cannot open the checkpoint directory {self.directory}: {e}') from e

  def _finish_deletions(self):
    """Empties `deleted/`, and deletes steps that a run stopped while deleting them (see
    `_half_deleted`)."""
    deleted = os.path.join(self.directory, _DELETED)
    for name in sorted(os.listdir(self.directory)):
      step_dir = os.path.join(self.directory, name)
      if name.isdigit() and _half_deleted(step_dir):
        os.makedirs(deleted, exist_ok=True)
        os.replace(step_dir, os.path.join(deleted, f'{name}.{os.getpid()}'))
        self._log(
            f'checkpoint step {name} in {self.directory} was being deleted when a run '
            f'stopped (no {_STEP_METADATA}): finished deleting it'
        )
    shutil.rmtree(deleted, ignore_errors=True)

  def _record_checksums(self):
    """Orbax calls this on every process once a step's items are written, before it renames
    the step into place: process 0 records the step's checksums (a failure here fails the
    save), then empties the steps retention deleted after the previous save."""
    if jax.process_index() != 0:
      return
    step = self._writing_step
    pending = glob.glob(os.path.join(self.directory, f'{step}.orbax-checkpoint-tmp*'))
    if not pending:  # an atomicity mode without a temporary directory
      pending = [self.step_directory(step)]
    checksums.record(max(pending, key=os.path.getmtime))
    shutil.rmtree(os.path.join(self.directory, _DELETED), ignore_errors=True)

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def step_directory(self, step):
    return os.path.join(self.directory, str(step))

  def should_save(self, step):
    """Every `save_every` steps, or once `save_every_minutes` passed since the last save
    (process 0's clock decides for all processes)."""
    if self._save_every and step % self._save_every == 0:
      return True
    if not self._save_seconds:
      return False
    if jax.process_count() == 1:
      return time.monotonic() - self._last_save_time >= self._save_seconds
    if step % _AGREE_EVERY_STEPS:
      return False
    due = time.monotonic() - self._last_save_time >= self._save_seconds
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))

  def save(self, step, state, data_iterator, config, tokenizer=None, records=None):
    """Starts an asynchronous save; returns once device arrays are copied to the host.
    `tokenizer`'s files, if given, are copied into the checkpoint; `records` (a JSON-able
    dict), if given, is saved as the `records` item.

    Refuses (CheckpointError) to write parameters that hold NaN or infinity.
    """
    bad = nonfinite_leaves(state.params)
    if bad:
      raise CheckpointError(f'not saving step {step}: non-finite parameters in {", ".join(bad)}')
    save_args = jax.tree.map_with_path(
        lambda key, value: ocp.SaveArgs(shard_axes=layer_chunk_axes(key, value)), state
    )
    items = dict(
        state=ocp.args.StandardSave(state, save_args=save_args),
        data=DataSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict()),
    )
    if tokenizer is not None:
      items['tokenizer'] = TokenizerSave(tokenizer)
    if records is not None:
      items['records'] = ocp.args.JsonSave(records)
    try:
      self._manager.wait_until_finished()  # the previous save: its failure is its own
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving_step, e) from e
    self._writing_step = step
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._saving_step = step
    self._last_save_time = time.monotonic()

  def check_save(self, step):
    """Called at each step boundary: raises SaveFailedError once the save in flight has
    failed. With several processes they agree every few steps (one collective)."""
    if self._saving_step is None:
      return
    done = not self._manager.is_saving_in_progress()
    if jax.process_count() > 1:
      if step % _AGREE_EVERY_STEPS:
        return
      done = bool(np.all(multihost_utils.process_allgather(np.asarray(done))))
    if done:
      self.wait()

  def _save_error(self, step, error):
    """The error of the failed save of `step`, in one line."""
    self._saving_step = None
    self._manager.reload()
    complete = [s for s in self._manager.all_steps() if s != step]
    newest = (
        f'step {max(complete)} in {self.directory} is the newest complete checkpoint and is intact'
        if complete
        else 'there is no complete checkpoint yet'
    )
    return SaveFailedError(
        f'saving checkpoint step {step} to {self.directory} failed: {first_line(error)}'
        f'{_free_space(self.directory)}. {newest}.',
        step,
    )

  def _read_error(self, step, error):
    older = [s for s in self._manager.all_steps() if s < step]
    hint = f'; if it is damaged, move it away to resume from step {max(older)}' if older else ''
    return CheckpointError(
        f'checkpoint step {step} in {self.step_directory(step)} cannot be '
        f'read ({type(error).__name__}: {first_line(error)}){hint}'
    )

  def verify(self, step):
    """What is damaged in `step` (see euro_lm.checksums.verify), or None. A step saved
    without checksums passes, with a note."""
    step_dir = self.step_directory(step)
    if not checksums.recorded(step_dir):
      self._log(
          f'checkpoint step {step} has no {checksums.FILE} (saved by an older euro_lm): '
          'restored without verifying its files'
      )
      return None
    return checksums.verify(step_dir)

  def _newest_intact(self, below):
    for step in sorted(self._manager.all_steps(), reverse=True):
      step_dir = self.step_directory(step)
      if step < below and not (checksums.recorded(step_dir) and checksums.verify(step_dir)):
        return step
    return None

  def set_aside(self, steps):
    """Moves `steps` (corrupt) into `<workdir>/corrupt_checkpoints/`, kept for inspection;
    returns that folder."""
    aside = os.path.join(os.path.dirname(self.directory), CORRUPT_DIRECTORY)
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, str(step))
        while os.path.exists(target):
          target += '.again'
        os.replace(self.step_directory(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('euro_lm_checkpoint_set_aside')
    self._manager.reload()
    return aside

  def restore(self, step, abstract_state, data_iterator, config, tokenizer):
    """Restores the state onto the shapes and shardings of `abstract_state` (a pytree of
    ShapeDtypeStructs, so the mesh may differ from the saving run's) and moves
    `data_iterator` to the saved position.

    Checks the step's files against its checksums while Orbax reads them (a mismatch is a
    CorruptCheckpointError naming the newest intact step, whatever else failed), and that
    the checkpoint fits this run: the same shape-fixing model fields, the same parameter
    and optimizer-state shapes, the same tokenizer (when `tokenizer` is given).
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      verification = pool.submit(self.verify, step)
      try:
        state = self._restore(step, abstract_state, data_iterator, config, tokenizer)
      except BaseException:
        self._raise_if_corrupt(step, verification.result())
        raise
      self._raise_if_corrupt(step, verification.result())
    return state

  def _raise_if_corrupt(self, step, problem):
    if problem:
      intact = self._newest_intact(step)
      newest = (
          f'the newest intact checkpoint is step {intact}'
          if intact is not None
          else 'no older checkpoint is intact'
      )
      raise CorruptCheckpointError(
          f'checkpoint step {step} in {self.step_directory(step)} is corrupt: {problem}; '
          f'{newest}',
          step,
          intact,
      ) from None

  def _restore(self, step, abstract_state, data_iterator, config, tokenizer):
    where_dir = self.step_directory(step)
    where = f'checkpoint step {step} in {where_dir}'
    has_tokenizer = tokenizer is not None and os.path.isdir(
        os.path.join(self.step_directory(step), 'tokenizer')
    )
    if tokenizer is not None and not has_tokenizer and not checksums.recorded(where_dir):
      self._log(
          f'{where} carries no tokenizer/ copy (saved by an older euro_lm): the tokenizer '
          f'{tokenizer.path} is used without checking that the checkpoint was trained with it'
      )
    items = dict(config=ocp.args.JsonRestore())
    if has_tokenizer:
      items['tokenizer'] = TokenizerRestore()
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(**items))
      metadata = _state_metadata(epath.Path(self.step_directory(step)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._read_error(step, e) from e
    # The fp8 state (`model.fp8`) starts fresh where the checkpoint's is not this run's: fp8
    # switched on or off, or a checkpoint saved before the field existed.
    keep_fp8 = 'fp8' in metadata and _shapes(metadata['fp8']) == _shapes(abstract_state.fp8)
    target = abstract_state
    if not keep_fp8 and 'fp8' in metadata:  # read what is there, then replace it
      replicated = abstract_state.step.sharding
      target = abstract_state.replace(
          fp8=jax.tree.map(
              lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
              metadata['fp8'],
          )
      )
    elif not keep_fp8:  # saved before TrainState.fp8 existed
      target = {
          f.name: getattr(abstract_state, f.name)
          for f in dataclasses.fields(abstract_state)
          if f.name != 'fp8'
      }
    differences = config_differences(saved['config'], config)
    differences += shape_differences(metadata, target)
    if differences:
      raise CheckpointError(
          f"{where} does not fit this run's config:\n  " + '\n  '.join(differences[:20])
      )
    if has_tokenizer and tokenizer.fingerprint != saved['tokenizer'].fingerprint:
      raise CheckpointError(
          f'the tokenizer {tokenizer.path} is not the one {where} was trained with; set '
          f'data.tokenizer_path={os.path.join(self.step_directory(step), "tokenizer")}'
      )
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), data=DataRestore(data_iterator)
          ),
      )
    except UserError:  # the data iterator refused the saved position (a changed mixture)
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise self._read_error(step, e) from e
    if keep_fp8:
      return restored['state']
    if abstract_state.fp8:
      self._log(f'{where} holds no fp8 state of this model: model.fp8 starts with fresh scales')
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state.fp8)
    fresh = jax.jit(lambda: fp8.fresh(abstract_state.fp8), out_shardings=shardings)()
    state = restored['state']
    if isinstance(state, dict):
      return abstract_state.replace(**state, fp8=fresh)
    return state.replace(fp8=fresh)

  def is_saving(self):
    return self._manager.is_saving_in_progress()

  def wait(self):
    """Blocks until the save in flight is on disk; raises SaveFailedError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving_step, e) from e
    self._saving_step = None

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()
      if jax.process_index() == 0:
        shutil.rmtree(os.path.join(self.directory, _DELETED), ignore_errors=True)


def resolve_checkpoint(path, step=None):
  """A step directory from a workdir, its `checkpoints/` directory or a step directory:
  the given `step` of the first two, else their newest complete step."""
  root = epath.Path(path)
  if step is None and (root / 'state').is_dir():
    return root
  if (root / 'checkpoints').is_dir():
    root = root / 'checkpoints'
  if step is not None:
    if not (root / str(step) / 'state').is_dir():
      raise CheckpointError(f'no checkpoint for step {step} in {root}')
    return root / str(step)
  steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else [])
  if not steps:
    raise CheckpointError(
        f'no checkpoint in {path} (expected a workdir, its checkpoints/ '
        'directory or a step directory)'
    )
  return root / str(steps[-1])


def find_tokenizer(step_dir, workdir, configured=''):
  """The tokenizer of a run: the checkpoint's own copy, else the workdir's (see
  `run_tokenizer`), else `configured` (the config's data.tokenizer_path); None if none."""
  saved = os.path.join(str(step_dir), 'tokenizer')
  if os.path.isdir(saved) and tokenizer_in(saved):
    return saved
  return run_tokenizer(str(workdir)) or (
      configured if configured and os.path.exists(configured) else None
  )


def init_model_config(init_from) -> dict:
  """The model section of the config `train.init_from`'s parameters were saved with: the
  checkpoint's own copy, else its workdir's config.json (an imported model's)."""
  step_dir = resolve_checkpoint(init_from)
  for path in (step_dir / 'config' / 'metadata', step_dir.parent.parent / 'config.json'):
    if path.is_file():
      try:
        model = json.loads(path.read_text()).get('model')
      except (OSError, ValueError) as e:
        raise CheckpointError(f'train.init_from: {path} is unreadable: {e}') from None
      if isinstance(model, dict):
        return model
  raise CheckpointError(
      f'train.model_from_init=True, but {step_dir} has no config with a model section (in '
      'config/metadata or its workdir config.json); set the model fields instead'
  )


def tokenizer_for_init(init_from, configured, workdir):
  """Before a new run starts from `train.init_from`'s parameters: makes it tokenize as they
  were trained, never with a freshly trained tokenizer whose ids mean something else.

  The source's tokenizer is the checkpoint's copy, else its workdir's (an imported
  model's). A run that names none (`configured`, data.tokenizer_path, empty) and has none
  in `workdir` gets a copy in `<workdir>/tokenizer/`. Raises CheckpointError when the run's
  tokenizer differs from the source's (naming both), and when the source carries none and
  the run names none. Returns the source's tokenizer path, or None.
  """
  step_dir = resolve_checkpoint(init_from)
  source = find_tokenizer(step_dir, step_dir.parent.parent)
  own = configured or run_tokenizer(workdir)
  if source is None:
    if configured:
      return None  # the user names the tokenizer; there is nothing to compare it with
    raise CheckpointError(
        f'train.init_from={init_from}: {step_dir} carries no tokenizer (an HF folder imported '
        'without tokenizer.json or tokenizer.model), and a new one would give its parameters '
        'unrelated ids; set data.tokenizer_path to the tokenizer they were trained with'
    )
  if own:
    if load_tokenizer(own).fingerprint != load_tokenizer(source).fingerprint:
      raise CheckpointError(
          f'the tokenizer {own} is not the one the parameters of train.init_from='
          f'{init_from} were trained with ({source}); set data.tokenizer_path={source}'
      )
  else:
    copy_tokenizer(load_tokenizer(source), os.path.join(workdir, 'tokenizer'))
  return source


def load_params(path, abstract_params):
  """The parameters alone from checkpoint `path` (see resolve_checkpoint), placed with the
  shardings of `abstract_params`: the start of continued pretraining or annealing."""
  _quiet_duplicate_orbax_reports()
  step_dir = resolve_checkpoint(path)
  problem = checksums.recorded(step_dir) and checksums.verify(step_dir)
  if problem:
    raise CheckpointError(f'checkpoint {step_dir} is corrupt: {problem}')
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = _state_metadata(step_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'checkpoint {step_dir} cannot be read ({type(e).__name__}: {first_line(e)})'
    ) from e
  differences = shape_differences(metadata.get('params', {}), abstract_params)
  if differences:
    raise CheckpointError(
        f"the parameters in {step_dir} do not fit this run's model:\n  "
        + '\n  '.join(differences[:20])
    )
  item = {'params': abstract_params}
  try:
    restored = checkpointer.restore(
        step_dir / 'state',
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'checkpoint {step_dir} cannot be read ({type(e).__name__}: {first_line(e)})'
    ) from e
  return restored['params'], step_dir
