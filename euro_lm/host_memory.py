"""Host memory for training on CPUs: keep freed memory in the process.

XLA:CPU allocates each step's temporaries as one large block and frees it when the step
ends. glibc gives blocks that big back to the kernel, so the next step faults every page in
again, which costs a large share of a CPU step and much of its jitter (BENCHMARKS.md). With
one malloc arena that neither maps big blocks separately nor trims its top, later steps
reuse the same pages.

The settings must be in place before jax starts its CPU backend. The thread that allocates
a step's temporaries is one of XLA's workers, and a thread that has already allocated keeps
its own arena, which maps every big block separately whatever `mallopt` says later. So
`configure_before_backend()` decides from the environment, without starting a backend,
whether this process will compute on CPUs. It leaves accelerator hosts alone: they
allocate little through malloc, and their data loader threads are better off with glibc's
per-thread arenas.

The price is memory. Before 2.38, glibc serves an aligned allocation (XLA's are) only from
a free block larger than asked for by the alignment, so a freed temporary whose neighbours
are taken cannot hold the next step's temporary of the same size, and the heap grows by
one more. `FragmentationGuard` gives the free pages back when that happens, so the process
holds one spare set of temporaries at most, and only until the step ends.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

import jax

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # mallopt takes an int; glibc stores the trim threshold as size_t, so SIZE_MAX

_applied = False


def keep_freed_memory():
  """Sets glibc malloc to one arena, no separately mapped blocks and no trimming.

  Returns whether it applied: False off Linux or with another C library. Idempotent. The
  process's memory then stays at its peak instead of being returned between steps. Threads
  that already allocated keep their own arenas, so call it before jax starts a backend
  (and before other libraries start threads).
  """
  global _applied
  if _applied:
    return True
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None)
  except OSError:
    return False
  if not hasattr(libc, 'gnu_get_libc_version'):  # glibc only
    return False
  mallopt = libc.mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  _applied = all(
      mallopt(option, value) == 1
      for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
  )
  return _applied


def keep_freed_memory_applied():
  """Whether `keep_freed_memory()` has applied in this process."""
  return _applied


def accelerator_plugin_installed():
  """Whether jax could find a GPU or TPU here, judged from installed packages only.

  jax finds accelerators through modules in the `jax_plugins` namespace or the
  `jax_plugins` entry-point group (CUDA, ROCm), and through the `libtpu` package.
  """
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if any(True for _ in importlib.metadata.entry_points(group='jax_plugins')):
    return True
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def will_compute_on_cpu(platforms=None):
  """Whether jax's default backend will be the CPU, decided without starting a backend.

  `platforms`: jax's `jax_platforms` setting (the JAX_PLATFORMS variable), read from jax's
  config when None. Its first entry is the default backend; unset, an installed accelerator
  plugin wins.
  """
  platforms = jax.config.jax_platforms if platforms is None else platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not accelerator_plugin_installed()


def configure_before_backend(enabled=True):
  """`keep_freed_memory()` if `enabled` and this process will compute on CPUs.

  Call it first thing (`hardware.keep_freed_host_memory` in the config). Returns whether
  the settings are in place.
  """
  return keep_freed_memory() if enabled and will_compute_on_cpu() else False


def resident_bytes():
  """The process's resident memory (RSS), from /proc (Linux)."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class FragmentationGuard:
  """Bounds what `keep_freed_memory()` holds: call `after_step()` once per training step.

  Make it after compiling the step and before running it. From then on the process may
  hold the step's temporaries and half a set more (fragments, or the start of a heap
  extension). Past that ceiling, `malloc_trim` returns every free page to the kernel, and
  the next step faults its temporaries in again, once. So a heap extension keeps one
  spare set of temporaries at most, and only until its step ends. The ceiling is fixed
  when the guard is made, so it does not matter where in an asynchronously dispatched step
  `after_step` runs; it only rises when the memory still in use after a trim needs it to.
  Does nothing unless `keep_freed_memory()` applied.
  """

  def __init__(self, compiled_step):
    analysis = compiled_step.memory_analysis()
    temp_bytes = analysis.temp_size_in_bytes if analysis is not None else 0
    self._allowance = temp_bytes + temp_bytes // 2
    self._ceiling = resident_bytes() + self._allowance if _applied else None
    self.trims = 0

  def after_step(self):
    """Trims if the process holds more than its ceiling; returns whether it trimmed."""
    if self._ceiling is None or resident_bytes() <= self._ceiling:
      return False
    ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    self.trims += 1
    self._ceiling = max(self._ceiling, resident_bytes() + self._allowance)
    return True
