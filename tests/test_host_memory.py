"""euro_lm.host_memory: freed blocks stay in the process, so touching them again costs no
page faults. Each case runs in a fresh interpreter: malloc settings are process-wide."""

import subprocess
import sys

import pytest

from euro_lm import host_memory

_SCRIPT = r'''
import ctypes, resource, sys
from euro_lm import host_memory
if sys.argv[1] == 'keep':
  assert host_memory.keep_freed_memory()
  assert host_memory.keep_freed_memory()  # idempotent
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 256 << 20  # a 256 MiB block: glibc maps blocks this big separately by default

def touch():
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)

touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def _faults(mode):
  out = subprocess.run([sys.executable, '-c', _SCRIPT, mode], check=True, capture_output=True,
                       text=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_freed_blocks_are_reused_without_page_faults():
  kept, default = _faults('keep'), _faults('default')
  pages = 3 * (256 << 20) // 4096
  assert kept < 0.01 * pages  # the same pages, already mapped
  assert default > 10 * max(kept, 1)  # glibc's default gives them back after each free


def test_applies_only_to_cpu_runs():
  assert host_memory.configure_for_platform('gpu') is False
  assert host_memory.configure_for_platform('tpu') is False
