"""An Orbax params checkpoint read and written one leaf at a time, so that host memory holds
one leaf (or one layer of it), not the model."""

import os

import numpy as np

from euro_lm.errors import HFError


class CheckpointLeaves:
  """Reads single leaves of an Orbax `state` item through TensorStore, so no more than one
  leaf is in memory."""

  def __init__(self, state_dir):
    self.state_dir = os.path.abspath(str(state_dir))

  def _open(self, name):
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    kvstores = [
        {'driver': 'ocdbt', 'base': 'file://' + self.state_dir, 'path': name},
        {'driver': 'file', 'path': os.path.join(self.state_dir, name)},
    ]
    errors = []
    for kvstore in kvstores:
      for driver in ('zarr', 'zarr3'):
        try:
          return ts.open({'driver': driver, 'kvstore': kvstore}, open=True).result()
        except Exception as e:  # pylint: disable=broad-except
          errors.append(f'{driver}/{kvstore["driver"]}: {e}')
    raise HFError(f'cannot read {name} from checkpoint {self.state_dir}: {errors[0]}')

  def read(self, path):
    return np.asarray(self._open('.'.join(('params',) + tuple(path))).read().result())

  def read_layers(self, path):
    """Yields `(i, leaf[i])` for a leaf stacked over layers, decompressing one stored chunk
    of layers at a time: a single layer from checkpoints written with per-layer chunks
    (euro_lm's own), the whole leaf from others."""
    store = self._open('.'.join(('params',) + tuple(path)))
    num_layers = store.shape[0]
    chunk = store.chunk_layout.read_chunk.shape
    step = chunk[0] if chunk and chunk[0] else num_layers
    for start in range(0, num_layers, step):
      block = np.asarray(store[start : start + step].read().result())
      for i, layer in enumerate(block):
        yield start + i, layer


def _nested(path, value):
  for key in reversed(path):
    value = {key: value}
  return value


def save_params(step_dir, leaves):
  """Writes `(euro_lm path, numpy leaf)` pairs as the params-only Orbax checkpoint
  `step_dir/state`, one leaf at a time (Orbax partial saves, committed at the end).

  Stacked leaves are stored one layer per chunk, as training stores them.
  """
  from orbax.checkpoint import v1 as ocp  # pylint: disable=import-outside-toplevel

  from euro_lm.checkpoint import layer_chunk_axes  # pylint: disable=import-outside-toplevel

  saving = ocp.options.ArrayOptions.Saving
  context = ocp.Context(
      array_options=ocp.options.ArrayOptions(
          saving=saving(
              # One file per chunk, written as it is encoded: OCDBT would buffer a whole
              # leaf's encoded chunks in memory until its commit (BENCHMARKS.md).
              use_ocdbt=False,
              use_zarr3=False,
              scoped_storage_options_creator=lambda key, value: saving.StorageOptions(
                  shard_axes=layer_chunk_axes(key, value)
              ),
          )
      ),
      # Each save below finishes before its leaf is dropped: no need for Orbax's copy.
      memory_options=ocp.options.MemoryOptions(deepcopy_host_arrays=False),
  )
  with context:
    for path, leaf in leaves:
      ocp.partial.save(step_dir, {'params': _nested(path, leaf)})
      del leaf
    ocp.partial.finalize(step_dir)
