"""One style for every file: pyink formats, ruff lints, with pyproject.toml's settings."""

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
FIX = 'pyink . && ruff check --fix .'


@pytest.mark.parametrize('tool,args', [('pyink', ('--check', '--diff')), ('ruff', ('check',))])
def test_the_style_tools_find_nothing(tool, args):
  executable = shutil.which(tool, path=str(pathlib.Path(sys.executable).parent)) or tool
  done = subprocess.run(
      [executable, *args, '.'], cwd=REPO, capture_output=True, text=True, check=False
  )
  assert done.returncode == 0, f'{tool} {" ".join(args)} . (to fix: {FIX}):\n' + (
      done.stdout[-4000:] + done.stderr[-2000:]
  )
