"""CRC-32 digests of a checkpoint's files: recorded when a step is written, checked before it
is restored, so flipped, truncated or missing bytes are found before anything trains on them.

`checksums.json` in a step directory maps each file of its items (path relative to the step)
to its size and the CRC-32 of each 64 MiB block. Blocks are digested by parallel threads (zlib
releases the GIL), so the cost follows the disk, not one core. CRC-32 finds accidental damage
(bit rot, a torn copy, a full disk), not deliberate tampering.
"""

import concurrent.futures
import json
import os
import zlib

FILE = 'checksums.json'
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


def _block_crc(path, offset):
  with open(path, 'rb') as f:
    f.seek(offset)
    return zlib.crc32(f.read(BLOCK_BYTES))


def _workers():
  return min(32, os.cpu_count() or 1)


def digest(step_dir, files):
  """{relative path: {'size': bytes, 'crc32': [one per block]}} of `files` in `step_dir`."""
  sizes = {name: os.path.getsize(os.path.join(step_dir, name)) for name in files}
  blocks = [(name, offset) for name in files for offset in range(0, sizes[name], BLOCK_BYTES)]
  with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
    crcs = pool.map(lambda b: _block_crc(os.path.join(step_dir, b[0]), b[1]), blocks)
    result = {name: {'size': sizes[name], 'crc32': []} for name in files}
    for (name, _), crc in zip(blocks, crcs):
      result[name]['crc32'].append(crc)
  return result


def record(step_dir):
  """Writes `checksums.json` for the item files of `step_dir` (atomically: a reader sees
  the whole file or none)."""
  path = os.path.join(step_dir, FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(
        {
            'algorithm': 'crc32',
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
    files, block_bytes = saved['files'], saved['block_bytes']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{FILE} is unreadable ({e})'
  if block_bytes != BLOCK_BYTES:
    return f'{FILE} has blocks of {block_bytes} bytes, not {BLOCK_BYTES}'
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
    if actual[name]['crc32'] != saved_file['crc32']:
      block = next(
          i for i, (a, b) in enumerate(zip(actual[name]['crc32'], saved_file['crc32'])) if a != b
      )
      return (
          f'{name}: content differs from its checksum '
          f'(bytes {block * BLOCK_BYTES}..{min((block + 1) * BLOCK_BYTES, saved_file["size"])})'
      )
  return None
