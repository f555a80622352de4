"""Safetensors files, without torch: a folder read tensor by tensor, and shards written as
a stream with their index."""

import json
import math
import os

import ml_dtypes
import numpy as np

from euro_lm.errors import HFError

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
SAFETENSORS_DTYPES = {
    'F32': np.float32,
    'BF16': ml_dtypes.bfloat16,
    'F16': np.float16,
    'F64': np.float64,
}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def _read_header(path):
  """{tensor name: info} of a safetensors file, and where its data starts; each tensor's
  bytes checked to lie in the file (a file cut short fails here, not at a later read)."""
  with open(path, 'rb') as f:
    file_size = os.fstat(f.fileno()).st_size
    size = int.from_bytes(f.read(8), 'little')
    if size > file_size - 8:
      raise ValueError(f'its header length {size} runs past the end of the file')
    header = json.loads(f.read(size))
  if not isinstance(header, dict):
    raise ValueError('its header is not a JSON object')
  header.pop('__metadata__', None)
  data_size = file_size - 8 - size
  for name, info in header.items():
    try:
      start, end = info['data_offsets']
      shape, dtype = [int(n) for n in info['shape']], info['dtype']
    except (KeyError, TypeError, ValueError):
      raise ValueError(f'tensor {name} has no valid dtype, shape and data_offsets') from None
    if not 0 <= start <= end:
      raise ValueError(f'tensor {name} has data_offsets {info["data_offsets"]}')
    if end > data_size:
      raise ValueError(
          f'tensor {name} ends at byte {8 + size + end}, past the end of the file at '
          f'{file_size} (cut short?)'
      )
    if dtype in SAFETENSORS_DTYPES:
      nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
      if end - start != nbytes:
        raise ValueError(f'tensor {name} of shape {shape} has {end - start} bytes, not {nbytes}')
  return header, 8 + size


def _weight_map(directory):
  """{tensor name: file name} of the folder's index file, or None without one."""
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      weight_map = json.load(f)['weight_map']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise HFError(f'{path} is not a safetensors index ({type(e).__name__}: {e})') from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
  ):
    raise HFError(f'{path}: weight_map must map tensor names to file names')
  return weight_map


class SafetensorsFolder:
  """Reads tensors by name from a folder of .safetensors files, memory-mapped, one at a
  time (bfloat16 through ml_dtypes, so neither torch nor safetensors' numpy API).

  The files transformers reads: `model.safetensors`, else those a
  `model.safetensors.index.json` maps, with the tensors it maps to them (other files in
  the folder, such as Mistral's `consolidated.safetensors`, are not read). Without
  either, every .safetensors file, and a tensor in two of them is refused.
  """

  def __init__(self, directory):
    self.directory = directory
    single = os.path.isfile(os.path.join(directory, SINGLE_FILE))
    weight_map = None if single else _weight_map(directory)
    if single:
      files = [SINGLE_FILE]
    elif weight_map is not None:
      files = sorted(set(weight_map.values()))
      for name in files:
        if not os.path.isfile(os.path.join(directory, name)):
          raise HFError(f'{os.path.join(directory, INDEX_FILE)} names {name}, which is missing')
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
    if not files:
      pickled = sorted(
          f for f in os.listdir(directory) if f.endswith(('.bin', '.pt', '.pth', '.ckpt', '.pkl'))
      )
      detail = (
          f' (it has {", ".join(pickled)}: pickled PyTorch weights, which euro_lm does '
          'not load because unpickling runs arbitrary code; convert them to '
          'safetensors first, e.g. save_pretrained(..., safe_serialization=True))'
          if pickled
          else ''
      )
      raise HFError(f'no *.safetensors weights in {directory}{detail}')
    self._where = {}
    for name in files:
      path = os.path.join(directory, name)
      try:
        header, offset = _read_header(path)
      except (OSError, ValueError) as e:
        raise HFError(f'{path} is not a safetensors file: {e}') from None
      for key, info in header.items():
        if weight_map is not None and weight_map.get(key) != name:
          continue  # the index maps this tensor elsewhere, or not at all
        if key in self._where:
          raise HFError(
              f'{directory}: tensor {key} is in both {os.path.basename(self._where[key][0])} '
              f'and {name}, and no {INDEX_FILE} says which to read'
          )
        self._where[key] = (path, offset, info)
    if weight_map is not None:
      missing = sorted(set(weight_map) - set(self._where))
      if missing:
        raise HFError(
            f'{os.path.join(directory, INDEX_FILE)} maps {missing[0]} to '
            f'{weight_map[missing[0]]}, which does not hold it'
        )

  def names(self):
    return sorted(self._where)

  def select(self, names):
    """Keeps only the tensors that `names` ({new name: stored name}) maps, under their new
    names (a multimodal folder's language model read as a text model)."""
    self._where = {new: self._where[stored] for new, stored in names.items()}

  def get(self, name):
    if name not in self._where:
      raise HFError(f'tensor {name} is missing from {self.directory}')
    path, offset, info = self._where[name]
    if info['dtype'] not in SAFETENSORS_DTYPES:
      raise HFError(
          f'{path}: tensor {name} has dtype {info["dtype"]}; euro_lm reads '
          f'{", ".join(SAFETENSORS_DTYPES)}'
      )
    start, end = info['data_offsets']
    dtype = np.dtype(SAFETENSORS_DTYPES[info['dtype']])
    data = np.memmap(path, dtype=np.uint8, mode='r', offset=offset + start, shape=(end - start,))
    return data.view(dtype).reshape(info['shape'])


class ShardWriter:
  """Writes `model-XXXXX-of-YYYYY.safetensors` shards one tensor at a time.

  Every tensor's name, shape and dtype is known before any is computed (`layout`, in
  writing order), so each shard's header is written first and a tensor goes to disk as
  soon as it is made: memory holds one tensor, not one shard. A shard holds at most about
  `max_bytes` (a larger tensor gets one of its own). Shards are written under temporary
  names and renamed by close(), so a failed export leaves no loadable half-model.
  """

  def __init__(self, directory, layout, max_bytes):
    self.directory = directory
    self._shards, size = [], 0  # [[(name, shape, dtype)]]
    for name, shape, dtype in layout:
      nbytes = math.prod(shape) * np.dtype(dtype).itemsize
      if not self._shards or (size and size + nbytes > max_bytes):
        self._shards.append([])
        size = 0
      self._shards[-1].append((name, tuple(shape), np.dtype(dtype)))
      size += nbytes
    self._pending = [(k, entry) for k, shard in enumerate(self._shards) for entry in shard]
    self._next, self._file, self._total = 0, None, 0

  def _part(self, k):
    return os.path.join(self.directory, f'.part-{k:05d}.safetensors')

  def _open(self, k):
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, shape, dtype in self._shards[k]:
      nbytes = math.prod(shape) * dtype.itemsize
      header[name] = {
          'dtype': _SAFETENSORS_NAMES[dtype],
          'shape': list(shape),
          'data_offsets': [offset, offset + nbytes],
      }
      offset += nbytes
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    self._file = open(self._part(k), 'wb')  # pylint: disable=consider-using-with
    self._file.write(len(text).to_bytes(8, 'little') + text)

  def add(self, name, array):
    if self._next == len(self._pending):
      raise ValueError(f'ShardWriter: {name} is not in the planned layout')
    k, (expected, shape, dtype) = self._pending[self._next]
    if (name, tuple(array.shape), array.dtype) != (expected, shape, dtype):
      raise ValueError(
          f'ShardWriter: got {name} {array.shape} {array.dtype}, '
          f'expected {expected} {shape} {dtype}'
      )
    if self._file is None:
      self._open(k)
    self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    self._total += array.nbytes
    self._next += 1
    if self._next == len(self._pending) or self._pending[self._next][0] != k:
      self._file.close()
      self._file = None

  def close(self):
    """Renames the finished shards and writes the index; returns the number of shards."""
    if self._next != len(self._pending):
      raise ValueError(f'ShardWriter: {self._pending[self._next][1][0]} was never written')
    n, weight_map = len(self._shards), {}
    umask = os.umask(0)
    os.umask(umask)
    for k, shard in enumerate(self._shards):
      name = f'model-{k + 1:05d}-of-{n:05d}.safetensors'
      os.replace(self._part(k), os.path.join(self.directory, name))
      os.chmod(os.path.join(self.directory, name), 0o666 & ~umask)  # not 0600 like a tmp file
      weight_map.update({entry[0]: name for entry in shard})
    index = {
        'metadata': {'total_size': self._total},
        'weight_map': dict(sorted(weight_map.items())),
    }
    with open(os.path.join(self.directory, INDEX_FILE), 'w', encoding='utf-8') as f:
      json.dump(index, f, indent=2)
    return n

  def abort(self):
    """Removes the temporary shards of an export that failed."""
    if self._file is not None:
      self._file.close()
    for k in range(len(self._shards)):
      if os.path.exists(self._part(k)):
        os.remove(self._part(k))
