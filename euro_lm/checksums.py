"""Digests of a checkpoint's files: recorded when a step is written, checked before it is
restored, so flipped, truncated or missing bytes are found before anything trains on them.

`checksums.json` in a step directory maps each file of its items (path relative to the step)
to its size and the XXH3-64 digest of each 64 MiB block. Blocks are read through mmap and
digested by parallel threads (xxhash releases the GIL), so the cost follows the disk and the
cores, not one core. XXH3 finds accidental damage (bit rot, a torn copy, a full disk), not
deliberate tampering.
"""

import concurrent.futures
import json
import mmap
import os

import xxhash

FILE = 'checksums.json'
ALGORITHM = 'xxh3_64'
BLOCK_BYTES = 64 << 20
_NOT_DIGESTED = frozenset({'commit_success.txt'})  # Orbax's commit markers, written after us


def item_files(step_dir):
  """Paths (relative to `step_dir`) of the files in its item directories."""
  found = []
  for entry in sorted(os.scandir(step_dir), key=lambda e: e.name):
    if not entry.is_dir(follow_symlinks=False):
      continue
    for root, dirs, files in os.walk(entry.path):
      dirs.sort()
      found += [
          os.path.relpath(os.path.join(root, name), step_dir)
          for name in sorted(files)
          if name not in _NOT_DIGESTED
      ]
  return found


def block_digest(data):
  """The digest of one block (bytes or a buffer)."""
  return xxhash.xxh3_64_intdigest(data)


def _file_digests(pool, path, size):
  """Futures of the digests of `path`'s blocks, read through one shared mmap."""
  if not size:
    return []
  with open(path, 'rb') as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  view = memoryview(mapped)
  return [
      pool.submit(block_digest, view[offset : offset + BLOCK_BYTES])
      for offset in range(0, size, BLOCK_BYTES)
  ]


def _workers():
  return min(32, os.cpu_count() or 1)


def digest(step_dir, files):
  """{relative path: {'size': bytes, 'digests': [one per block]}} of `files` in `step_dir`."""
  result = {}
  with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
    pending = {}
    for name in files:
      path = os.path.join(step_dir, name)
      size = os.path.getsize(path)
      pending[name] = (size, _file_digests(pool, path, size))
    for name, (size, futures) in pending.items():
      result[name] = {'size': size, 'digests': [f.result() for f in futures]}
  return result


def record(step_dir):
  """Writes `checksums.json` for the item files of `step_dir` (atomically: a reader sees
  the whole file or none)."""
  path = os.path.join(step_dir, FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(
        {
            'algorithm': ALGORITHM,
            'block_bytes': BLOCK_BYTES,
            'files': digest(step_dir, item_files(step_dir)),
        },
        f,
    )
  os.replace(path + '.tmp', path)


def recorded(step_dir):
  return os.path.isfile(os.path.join(step_dir, FILE))


def verify(step_dir):
  """What differs between `step_dir` and its recorded checksums ('state/d/ab12: content
  differs from its checksum'), or None if nothing does. Call only if `recorded`."""
  try:
    with open(os.path.join(step_dir, FILE), encoding='utf-8') as f:
      saved = json.load(f)
    files, block_bytes, algorithm = saved['files'], saved['block_bytes'], saved['algorithm']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{FILE} is unreadable ({e})'
  if (algorithm, block_bytes) != (ALGORITHM, BLOCK_BYTES):
    return (
        f'{FILE} holds {algorithm} of {block_bytes}-byte blocks, not {ALGORITHM} of {BLOCK_BYTES}'
    )
  for name in files:
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
      return f'{name} is missing'
    size = os.path.getsize(path)
    if size != files[name]['size']:
      return f'{name} has {size} bytes, {files[name]["size"]} when saved'
  try:
    actual = digest(step_dir, list(files))
  except OSError as e:
    return f'{e.filename} cannot be read ({e.strerror})'
  for name, saved_file in files.items():
    if actual[name]['digests'] != saved_file['digests']:
      pairs = zip(actual[name]['digests'], saved_file['digests'])
      block = next(i for i, (a, b) in enumerate(pairs) if a != b)
      return (
          f'{name}: content differs from its checksum '
          f'(bytes {block * BLOCK_BYTES}..{min((block + 1) * BLOCK_BYTES, saved_file["size"])})'
      )
  return None
