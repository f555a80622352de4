"""Errors that are the user's to fix: entry points print their message, not a traceback;
and reading a user's JSON file, where a bad one is such an error."""

import json


class UserError(Exception):
  """Bad input (a config field, a file, a missing package); the message says what to fix."""


class ConfigError(UserError, ValueError):
  """An impossible setting; the message names the field and its value."""


class DataError(UserError, ValueError):
  """An unreadable corpus, catalog or tokenizer file; the message names the file."""


class HFError(UserError, ValueError):
  """A Hugging Face folder or config that euro_lm cannot read or write; names the field."""


class ArgumentError(UserError, ValueError):
  """An argument out of its range (a command line's flag, usually); names it and its value."""


def read_json_object(path, error: type[UserError], what: str = 'a JSON object') -> dict:
  """The JSON object in the file `path`.

  Raises:
    error: naming `path`, if the file is unreadable or not JSON ('is not valid JSON: ...'),
      or holds something other than an object ('is not ' + `what`).
  """
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise error(f'{path} is not valid JSON: {e}') from e
  if not isinstance(value, dict):
    raise error(f'{path} is not {what}')
  return value
