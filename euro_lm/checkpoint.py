"""Orbax checkpoints of the train state, the data position, the config and the tokenizer.

A step's checkpoint is `<workdir>/checkpoints/<step>/` with items
  state      params, optimizer state, step and skip counters (sharded arrays, OCDBT)
  data       each process's data iterator position (restorable onto another process count)
  config     the resolved config (JSON, human-readable)
  tokenizer  the files of the tokenizer the run trains with (the checkpoint stands alone)
Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it only when every item
of every process is written, so a save cut short (SIGKILL, a node failure, a full disk)
leaves no step directory; it is ignored, and deleted when the next run opens the directory.
"""

import dataclasses
import os
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from euro_lm.config import base_config
from euro_lm.data.tokenizer import copy_tokenizer, load_tokenizer, run_tokenizer, tokenizer_in
from euro_lm.errors import UserError
from euro_lm.finite import leaf_name, nonfinite_leaves

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


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be written or read; the message says which and why."""


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
      for file in args.tokenizer.files:
        shutil.copyfile(file, epath.Path(directory) / os.path.basename(file))

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


def _free_space(path):
  try:
    return f'; {shutil.disk_usage(path).free / 2**30:.1f} GiB free there'
  except OSError:
    return ''


class Checkpointer:
  """Asynchronous saves every `save_every` steps and/or `save_every_minutes`; keeps the
  newest `keep` checkpoints plus every `keep_every`-th step."""

  def __init__(self, directory, *, save_every=0, save_every_minutes=0.0, keep=3, keep_every=0):
    self.directory = os.path.abspath(directory)
    policies = [preservation.LatestN(n=keep)]
    if keep_every:
      policies.append(preservation.EveryNSteps(interval_steps=keep_every))
    options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        preservation_policy=preservation.AnyPreservationPolicy(policies),
    )
    self._save_every = save_every
    self._save_seconds = save_every_minutes * 60
    self._last_save_time = time.monotonic()
    self._saving_step = None  # the step of the save that may still be in flight
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise CheckpointError(f'cannot open the checkpoint directory {self.directory}: {e}') from e

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

  def save(self, step, state, data_iterator, config, tokenizer=None):
    """Starts an asynchronous save; returns once device arrays are copied to the host.
    `tokenizer`'s files, if given, are copied into the checkpoint.

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
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._saving_step = step
    self._last_save_time = time.monotonic()

  def _save_error(self, step, error):
    """The error of a failed save: a previous async save's if one was in flight."""
    failed = self._saving_step if self._saving_step not in (None, step) else step
    self._saving_step = None
    complete = [s for s in self._manager.all_steps() if s != failed]
    newest = (
        f'step {max(complete)} in {self.directory} is the newest complete checkpoint and is intact'
        if complete
        else 'there is no complete checkpoint yet'
    )
    return CheckpointError(
        f'saving checkpoint step {failed} to {self.directory} failed: {error}'
        f'{_free_space(self.directory)}. {newest}.'
    )

  def _read_error(self, step, error):
    older = [s for s in self._manager.all_steps() if s < step]
    hint = f'; if it is damaged, move it away to resume from step {max(older)}' if older else ''
    return CheckpointError(
        f'checkpoint step {step} in {self.step_directory(step)} cannot be '
        f'read ({type(error).__name__}: {error}){hint}'
    )

  def restore(self, step, abstract_state, data_iterator, config, tokenizer):
    """Restores the state onto the shapes and shardings of `abstract_state` (a pytree of
    ShapeDtypeStructs, so the mesh may differ from the saving run's) and moves
    `data_iterator` to the saved position.

    First checks that the checkpoint fits this run: the same shape-fixing model fields,
    the same parameter and optimizer-state shapes, the same tokenizer (when `tokenizer`
    is given).
    """
    has_tokenizer = tokenizer is not None and os.path.isdir(
        os.path.join(self.step_directory(step), 'tokenizer')
    )
    items = dict(config=ocp.args.JsonRestore())
    if has_tokenizer:
      items['tokenizer'] = TokenizerRestore()
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(**items))
      metadata = _state_metadata(epath.Path(self.step_directory(step)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._read_error(step, e) from e
    where = f'checkpoint step {step} in {self.step_directory(step)}'
    differences = config_differences(saved['config'], config)
    differences += shape_differences(metadata, abstract_state)
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
              state=ocp.args.StandardRestore(abstract_state), data=DataRestore(data_iterator)
          ),
      )
    except UserError:  # the data iterator refused the saved position (a changed mixture)
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise self._read_error(step, e) from e
    return restored['state']

  def is_saving(self):
    return self._manager.is_saving_in_progress()

  def wait(self):
    """Blocks until the save in flight is on disk; raises CheckpointError if it failed."""
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
  step_dir = resolve_checkpoint(path)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = _state_metadata(step_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'checkpoint {step_dir} cannot be read ({type(e).__name__}: {e})') from e
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
    raise CheckpointError(f'checkpoint {step_dir} cannot be read ({type(e).__name__}: {e})') from e
  return restored['params'], step_dir
