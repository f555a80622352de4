"""Host memory for training on CPUs: keep freed memory in the process.

XLA:CPU allocates each step's temporaries with malloc (gigabytes for a 125M model) and
frees them when the step ends. glibc returns every block over 32 MB to the kernel, so the
next step faults all those pages in again: a million page faults and about a second of a
12-second step on 2 cores, plus much of the step-to-step jitter. With one malloc arena that
neither maps big blocks separately nor trims its top, later steps reuse the same pages.

Applied to CPU runs only (`configure_for_platform`): accelerator hosts allocate little
through malloc, and their data loader threads are better off with glibc's per-thread arenas.
"""

import ctypes
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_applied = False


def keep_freed_memory():
  """Sets glibc malloc to one arena, no separately mapped blocks and (almost) no trimming.

  Returns whether it applied: False off Linux or with another C library. Idempotent. The
  process's memory then stays at its peak instead of being returned between steps. Threads
  that already allocated keep their own arenas, so call it before the first computation.
  """
  global _applied
  if _applied:
    return True
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  _applied = all(mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
  return _applied


def configure_for_platform(platform):
  """`keep_freed_memory()` when the devices are CPUs (`platform`: e.g. jax's 'cpu', 'gpu')."""
  return keep_freed_memory() if platform == 'cpu' else False
