"""Every notebooks/*.ipynb is stored without outputs and executes headless (nbclient).

How the notebooks run here, and so what each notebook may assume:
- the kernel is this Python (`sys.executable`, ipykernel), whatever kernelspecs are installed;
- its working directory is `notebooks/`, as when Jupyter opens the notebook; a notebook
  that needs `configs` finds the repository root itself (quickstart.ipynb's setup cell);
- its environment is this one with JAX_PLATFORMS=cpu, one CPU device (the 8 fake devices
  of conftest.py are taken out of XLA_FLAGS), MPLBACKEND=Agg and the repository root on
  PYTHONPATH, and TMPDIR a fresh pytest directory (tempfile.mkdtemp() for scratch work);
- it has NOTEBOOK_TIMEOUT seconds in all (a notebook may set another budget in its metadata
  as {"euro_lm": {"timeout": seconds}}); a failing cell fails the test with its source and
  traceback.

New notebooks are picked up by the glob; keep their settings small (the whole set should
run in a few minutes on 2 cores) and store them without outputs, e.g.
`jupyter nbconvert --clear-output --inplace notebooks/NAME.ipynb`.
"""

import glob
import os
import sys
import time

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))
NOTEBOOK_TIMEOUT = 300  # seconds per notebook, all cells together
KERNEL = 'python3'


def _ids(paths):
  return [os.path.basename(p) for p in paths]


def kernel_env(tmpdir):
  """The kernel's environment overrides: CPU, one device, no display, the repository, and
  `tmpdir` for temporary files (a notebook's scratch workdirs go with the test's)."""
  xla_flags = ' '.join(
      f
      for f in os.environ.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')
  )
  pythonpath = os.pathsep.join(p for p in [REPO, os.environ.get('PYTHONPATH', '')] if p)
  return {
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': xla_flags,
      'MPLBACKEND': 'Agg',
      'PYTHONPATH': pythonpath,
      'TF_CPP_MIN_LOG_LEVEL': '2',
      'TMPDIR': str(tmpdir),
  }


class ThisPythonKernels(KernelSpecManager):
  """The `python3` kernel is ipykernel in this interpreter, with `kernel_env(tmpdir)`."""

  def __init__(self, tmpdir, **kwargs):
    super().__init__(**kwargs)
    self.tmpdir = tmpdir

  def get_kernel_spec(self, kernel_name):
    if kernel_name != KERNEL:
      return super().get_kernel_spec(kernel_name)
    return KernelSpec(
        argv=[
            sys.executable,
            '-m',
            'ipykernel_launcher',
            '-f',
            '{connection_file}',
            '--InteractiveShell.colors=nocolor',
        ],
        display_name='Python 3 (euro_lm tests)',
        language='python',
        env=kernel_env(self.tmpdir),
    )


def test_notebooks_exist():
  assert 'quickstart.ipynb' in _ids(NOTEBOOKS)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
  assert nb.nbformat == 4, f'{path}: nbformat {nb.nbformat}, not 4'
  nbformat.validate(nb)
  dirty = [
      i
      for i, cell in enumerate(nb.cells)
      if cell.cell_type == 'code'
      and (cell.get('outputs') or cell.get('execution_count') is not None)
  ]
  assert not dirty, (
      f'{path}: code cells {dirty} (0-based) are stored with outputs or '
      'execution counts; clear them: jupyter nbconvert --clear-output '
      f'--inplace {os.path.relpath(path, REPO)}'
  )


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, tmp_path):
  name = os.path.basename(path)
  nb = nbformat.read(path, as_version=4)
  budget = nb.metadata.get('euro_lm', {}).get('timeout', NOTEBOOK_TIMEOUT)
  deadline = time.monotonic() + budget

  def cell_timeout(cell):  # what the notebook has left: the budget is the whole notebook's
    del cell
    return max(1, int(deadline - time.monotonic()))

  # An async kernel manager (nbclient's default): with a blocking client nbclient's timeouts
  # and dead-kernel checks never run.
  km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=ThisPythonKernels(tmp_path))
  client = nbclient.NotebookClient(
      nb,
      km=km,
      timeout_func=cell_timeout,
      kernel_name=KERNEL,
      startup_timeout=120,
      resources={'metadata': {'path': NOTEBOOK_DIR}},
  )
  start = time.monotonic()
  try:
    client.execute()
  except CellTimeoutError as e:
    pytest.fail(f'{name} ran past its {budget}s budget:\n{e}', pytrace=False)
  except CellExecutionError as e:  # the message holds the cell's source and traceback
    pytest.fail(f'{name}: a cell failed:\n{e}', pytrace=False)
  except DeadKernelError as e:
    pytest.fail(f'{name}: the kernel died: {e}', pytrace=False)
  print(f'{name} executed in {time.monotonic() - start:.1f}s')
