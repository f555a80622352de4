"""Errors that are the user's to fix: entry points print their message, not a traceback."""


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
