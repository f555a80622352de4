"""Command-line flags that describe raw text files, shared by the data command lines."""

from absl import flags

from euro_lm.data import conversations
from euro_lm.data.prepare import sources
from euro_lm.errors import ConfigError

FORMAT = flags.DEFINE_enum(
    'format', 'auto', sources.FORMATS, 'Input format; auto: from each file name.'
)
TEXT_FIELD = flags.DEFINE_string('text_field', 'text', 'JSON field or Parquet column of the text.')
LANGUAGE_FIELD = flags.DEFINE_string(
    'language_field', '', "Field or column of each record's language code."
)
LANGUAGE = flags.DEFINE_string(
    'language', '', 'Language of every record (e.g. deu_Latn), if no field.'
)
STRICT = flags.DEFINE_bool(
    'strict',
    False,
    'Stop with an error at the first bad record, truncated file or empty file instead of'
    ' counting it.',
)
ALL = (FORMAT, TEXT_FIELD, LANGUAGE_FIELD, LANGUAGE, STRICT)


def text_source() -> sources.TextSource:
  """The TextSource the flags describe."""
  return sources.TextSource(
      format=FORMAT.value,
      text_field=TEXT_FIELD.value,
      language_field=LANGUAGE_FIELD.value,
      language=LANGUAGE.value,
      strict=STRICT.value,
  )


def conversation_source(messages_field: str) -> conversations.ConversationSource:
  """The ConversationSource the flags describe (the language optional)."""
  return conversations.ConversationSource(
      format=FORMAT.value,
      messages_field=messages_field,
      language_field=LANGUAGE_FIELD.value,
      language=LANGUAGE.value,
      strict=STRICT.value,
  )


def input_text_source(input_given: bool) -> sources.TextSource | None:
  """The TextSource of --input files; None without --input.

  Raises:
    ConfigError: a source flag is set, but there is no --input it applies to.
  """
  if input_given:
    return text_source()
  if given := [f'--{f.name}' for f in ALL if f.present]:
    raise ConfigError(f'{", ".join(given)}: set for --input files, but --input is not given.')
  return None
