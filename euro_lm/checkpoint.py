"""Orbax checkpoints of the train state, the data iterator and the resolved config.

Each step's checkpoint is a directory `<workdir>/checkpoints/<step>/` with items `state`
(params, optimizer state, step; sharded arrays), `data` (each process's data iterator
position, restorable onto another process count) and `config` (JSON, human-readable). Orbax writes into a temporary directory
and renames it when complete, so an interrupted save is never taken for a checkpoint.
"""

import dataclasses
import os
from typing import Any

import grain
import orbax.checkpoint as ocp


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


class Checkpointer:
  """Asynchronous saves every `save_every` steps, keeping the newest `keep`."""

  def __init__(self, directory, *, save_every, keep):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self._save_every = save_every
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self._manager.latest_step()

  def should_save(self, step):
    return bool(self._save_every) and step % self._save_every == 0

  def save(self, step, state, data_iterator, config):
    """Starts an asynchronous save; returns once device arrays are copied to the host."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict())), force=True)

  def restore(self, step, abstract_state, data_iterator):
    """Restores the state onto the shapes and shardings of `abstract_state` (a pytree of
    ShapeDtypeStructs, so the mesh may differ from the saving run's) and moves
    `data_iterator` to the saved position."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=DataRestore(data_iterator)))
    return restored['state']

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
