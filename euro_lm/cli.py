"""The top-level handler every euro_lm command line runs in: `run(main)` for `app.run(main)`.

Expected failures end as one `error: ...` line on stderr and exit status 1 (130 for Ctrl-C):
a `UserError` (bad config, file or flag), an `OSError` (a missing, unreadable or full file
or directory), a flag that does not parse, a config file that does not load. `--verbose`
(or the environment variable EURO_LM_VERBOSE=1) prints their traceback too. Any other
exception is a bug (in euro_lm, or in a config file's code): its traceback is always
printed, then an `error:` line.
"""

import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_dict

from euro_lm.errors import UserError

_VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'Print the traceback of an error too (also EURO_LM_VERBOSE=1).'
)
VERBOSE_ENV = 'EURO_LM_VERBOSE'
_INTERRUPTED_STATUS = 130  # as a shell reports a process ended by SIGINT


def verbose() -> bool:
  """Whether errors are printed with their traceback."""
  if os.environ.get(VERBOSE_ENV, '').strip().lower() in ('1', 'true', 'yes'):
    return True
  return flags.FLAGS.is_parsed() and _VERBOSE.value


def describe(error: BaseException) -> str:
  """The one-line text of an expected failure: the message, or for an OSError its reason
  and the file it names."""
  if isinstance(error, OSError) and error.strerror:
    names = [n for n in (error.filename, error.filename2) if n is not None]
    return error.strerror + (': ' + ' -> '.join(map(str, names)) if names else '')
  if isinstance(error, KeyboardInterrupt):
    return 'interrupted'
  return str(error) or type(error).__name__


def _user_error_in_chain(error):
  """The innermost UserError this error was raised from or while handling, if any
  (ml_collections rewraps what a config's get_config raises, its traceback in the text)."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    if isinstance(error, UserError):
      found = error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return found


def _fail(message, status=1):
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  sys.exit(status)


def _flag_error(error):
  """absl's message, without the traceback text ml_collections puts into it when a config
  file's code raises: then its first line and the innermost error."""
  message = str(error)
  if 'Traceback' not in message:
    return message.replace('\n', ' ')
  inner = error
  while inner.__cause__ or inner.__context__:
    inner = inner.__cause__ or inner.__context__
  return f'{message.splitlines()[0]} {type(inner).__name__}: {inner}'


def _unknown_field(error, argv):
  """'unknown config field ...' for ml_collections' AttributeError/KeyError of an override."""
  while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(..))
    error = error.args[0]
  detail = str(error.args[0] if error.args else error).replace('\n', '. ')
  overrides = ' '.join(a for a in argv[1:] if a.startswith('--config'))
  return f'unknown config field {detail} (arguments: {overrides})'


def _check_config_files(argv):
  """ml_collections defers a config file's load error until the config is used (or fails
  on an override with a long text); name the file instead."""
  for name in list(flags.FLAGS):
    if flags.FLAGS[name].flag_type() != 'config object':  # a config file's flag
      continue
    for arg in argv[1:]:
      if arg.startswith(f'--{name}='):
        path = arg.split('=', 1)[1].split(':', 1)[0]
        if not os.path.isfile(path):
          problem = 'is not a file' if os.path.exists(path) else 'does not exist'
          _fail(f'--{name}: config file {path!r} {problem}')
    value = flags.FLAGS[name].value
    if value is not None and not isinstance(value, config_dict.ConfigDict):
      try:
        _ = value['model']  # a placeholder: raises the error that stopped the load
      except OSError as e:
        _fail(f'--{name}: config file cannot be loaded: {describe(e).splitlines()[0]}')


def parse_flags(argv):
  """absl's flag parsing, with its errors as one `error:` line."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    user_error = _user_error_in_chain(e)
    _fail(describe(user_error) if user_error else _flag_error(e))
  except (AttributeError, KeyError) as e:  # how ml_collections reports an unknown field
    _fail(_unknown_field(e, argv))
  except UserError as e:
    _fail(describe(_user_error_in_chain(e)))
  except OSError as e:  # an override of a config file that did not load
    _check_config_files(argv)
    _fail(describe(e).splitlines()[0])
  except Exception as e:  # code that failed: a config file's or euro_lm's
    traceback.print_exc()
    _fail(f'reading the command line failed ({type(e).__name__}: {e}); see the traceback above')
  _check_config_files(argv)
  return remaining


def run(main, argv=None, flags_parser=parse_flags):
  """`app.run(main)` with euro_lm's error handling (see the module docstring); `argv`
  defaults to sys.argv."""

  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      _fail(describe(e))
    except (UserError, OSError, KeyboardInterrupt) as e:
      if verbose():
        traceback.print_exc()
      _fail(describe(e), _INTERRUPTED_STATUS if isinstance(e, KeyboardInterrupt) else 1)
    except Exception as e:  # a bug: keep everything needed to report it
      traceback.print_exc()
      _fail(f'internal error ({type(e).__name__}: {e}); the traceback above is a bug to report')

  app.run(guarded, argv=argv, flags_parser=flags_parser)
