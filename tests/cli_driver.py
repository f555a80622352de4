"""Runs one command line on several argument lists, each through `euro_lm.cli.run` as
`python -m MODULE ARGS` would, and prints a JSON list of {"status": exit status, "stderr":
what it wrote to stderr}.

`python tests/cli_driver.py MODULE CASES_JSON [PRELOAD,...]` (CASES_JSON: a list of argument
lists; PRELOAD: modules the command imports late, such as euro_lm.train.loop). They are
imported once (with jax, the slow part of starting); each case
runs in a fork of this process, so it starts with unparsed flags as a new process would.
"""

import contextlib
import importlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from euro_lm import cli  # noqa: E402


def run_case(main_fn, argv):
  stderr = io.StringIO()
  status = 0
  with contextlib.redirect_stderr(stderr):
    try:
      cli.run(main_fn, argv=argv)
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return {'status': status, 'stderr': stderr.getvalue()}


def main():
  module_name, cases = sys.argv[1], json.loads(sys.argv[2])
  for preload in ['jax', *filter(None, (sys.argv[3:] or [''])[0].split(','))]:
    importlib.import_module(preload)
  module = importlib.import_module(module_name)
  if hasattr(module, '__path__'):  # a package: `python -m` runs its __main__
    module = importlib.import_module(module_name + '.__main__')
  results = []
  for args in cases:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child runs one case and reports it through the pipe
      os.close(read_end)
      try:
        sys.argv = [module_name, *args]  # ml_collections reads overrides from sys.argv
        with contextlib.redirect_stdout(io.StringIO()):
          result = run_case(module.main, sys.argv)
        with os.fdopen(write_end, 'w') as f:
          json.dump(result, f)
      finally:
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
      text = f.read()
    os.waitpid(pid, 0)
    results.append(json.loads(text) if text else {'status': None, 'stderr': 'the case died'})
  sys.stdout.write(json.dumps(results))


if __name__ == '__main__':
  main()
