"""Conversations from raw files (JSONL, plain or .gz/.zst, and Parquet), and training
examples from them.

One conversation per record: `{"messages": [{"role": ..., "content": ...}, ...]}` with roles
system, user and assistant, and optionally a language field. Files are read by
euro_lm.data.prepare.sources' readers, with their positions, bad-record reports and
integrity checks: `path:line` for JSONL (from 1), `path row N` for Parquet (from 0); a
record that cannot be a conversation, or a conversation that cannot be a training example
(see euro_lm.data.chat), is counted by kind, never dropped silently, or raises at the first
one when the source is strict; a file cut short or corrupt keeps what comes before the
fault and is reported truncated there.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from euro_lm.data import chat, languages
from euro_lm.data.prepare.sources import (
    FORMATS,
    INVALID_UTF8,
    MISSING_FIELD,
    UNKNOWN_LANGUAGE,
    BadRecord,
    BadRecords,
    LanguageCache,
    file_format,
    jsonl_records,
    language_column_problem,
    parquet_batches,
    parse_json,
)
from euro_lm.data.tokenizer import Tokenizer
from euro_lm.errors import ConfigError

# The language of conversations whose source names none.
UNDETERMINED = 'und'
# Kinds of bad records besides sources.py's (invalid_json, invalid_utf8, missing_field,
# unknown_language) and chat.py's (template_error, unmaskable, too_long).
BAD_MESSAGES = 'bad_messages'  # not a list of {role, content} objects with text content
UNSUPPORTED_ROLE = 'unsupported_role'  # a role other than system/user/assistant
BAD_ORDER = 'bad_order'  # a system message after the first, or an assistant before any user
NO_ASSISTANT = 'no_assistant'  # nothing to learn from
EMPTY_ASSISTANT = 'empty_assistant'  # an assistant turn with blank content

# Roles of tool use, refused with their own reason until euro_lm renders tool calls.
_TOOL_ROLES = ('tool', 'tool_results', 'ipython', 'function')
# Rows per Parquet batch: bounds memory whatever the row-group size.
_PARQUET_BATCH_ROWS = 256


class Conversation(NamedTuple):
  messages: list[dict]  # [{'role': ..., 'content': ...}], checked by check_messages
  language: str  # canonical tag, or '' when the source names none
  position: int  # line (JSONL, from 1) or row (Parquet, from 0) in its file


class Example(NamedTuple):
  ids: np.ndarray  # int32 [length]
  loss_mask: np.ndarray  # int32 [length]: 1 where the token is a target that counts
  language: str
  location: str  # path:line or path row N


def check_messages(messages) -> tuple[str, str] | None:
  """(kind, reason) if `messages` is not a conversation euro_lm trains on, else None.

  A conversation is a non-empty list of {role, content} objects, content a string or a
  list of text parts ({"type": "text", "text": ...}, which the template gets as they are:
  Mistral Small 3.1's takes its system prompt only so); roles system (only as the first
  message), user and assistant; the first other message a user's; at least one assistant
  message, none blank. Whether turns must alternate is the
  template's to say (Mistral's and Gemma's do; their refusal is a template_error).
  """
  if not isinstance(messages, list) or not messages:
    return BAD_MESSAGES, f'messages is a {type(messages).__name__}, not a non-empty list'
  assistants, users = 0, 0
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      return BAD_MESSAGES, f'message {i} is a {type(message).__name__}, not an object'
    role, content = message.get('role'), message.get('content')
    if role in _TOOL_ROLES:
      return UNSUPPORTED_ROLE, f'message {i}: role {role!r} (tool use) is not supported yet'
    if role not in chat.ROLES:
      return UNSUPPORTED_ROLE, f'message {i}: role {role!r} is not one of {chat.ROLES}'
    if isinstance(content, list):
      problem = _text_parts_problem(content)
      if problem:
        return BAD_MESSAGES, f'message {i}: {problem}'
      content = ''.join(part['text'] for part in content)
    elif not isinstance(content, str):
      return BAD_MESSAGES, (
          f'message {i}: content is a {type(content).__name__}, not a string or a list of '
          'text parts'
      )
    try:
      content.encode('utf-8')  # JSON escapes can spell lone surrogates
    except UnicodeEncodeError as e:
      return INVALID_UTF8, f'message {i}: content is not valid Unicode: {e}'
    if role == 'system' and i > 0:
      return BAD_ORDER, f'message {i}: a system message can only be the first'
    users += role == 'user'
    if role == 'assistant':
      if not users:
        return BAD_ORDER, f'message {i}: an assistant message before any user message'
      if not content.strip():
        return EMPTY_ASSISTANT, f'message {i}: an assistant message with no text'
      assistants += 1
  if not assistants:
    return NO_ASSISTANT, 'no assistant message: nothing to learn from'
  return None


def _text_parts_problem(parts) -> str | None:
  """Why a content list is not a list of text parts, or None."""
  if not parts:
    return 'content is an empty list'
  for j, part in enumerate(parts):
    if not isinstance(part, dict):
      return f'content part {j} is a {type(part).__name__}, not an object'
    if part.get('type') != 'text':
      return f'content part {j} has type {part.get("type")!r}; euro_lm trains on text parts'
    if not isinstance(part.get('text'), str):
      return f'content part {j} has no string "text"'
  return None


@dataclasses.dataclass(frozen=True)
class ConversationSource:
  """How to read conversations from raw files.

  Attributes:
    format: 'jsonl', 'parquet', or 'auto' (from each file's name).
    messages_field: the field or column holding the list of messages (in Parquet a list of
      structs with `role` and `content`, or a JSON string of the list).
    language_field: the field or column with each record's language code, optional.
    language: the language of every record, optional; not with `language_field`.
    strict: raise `DataError` at the first bad record instead of counting it.
  """

  format: str = 'auto'
  messages_field: str = 'messages'
  language_field: str = ''
  language: str = ''
  strict: bool = False

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ConfigError(f'format={self.format!r} is not one of {FORMATS}.')
    if self.language_field and self.language:
      raise ConfigError(
          f'Set at most one of language={self.language!r} and'
          f' language_field={self.language_field!r}.'
      )
    if self.language:
      try:
        object.__setattr__(self, 'language', languages.resolve_language(self.language))
      except ValueError as e:
        raise ConfigError(f'language={self.language!r}: {e}') from None

  def read(self, path: str) -> tuple[Iterator[Conversation], BadRecords]:
    """The conversations of one file, and its bad-record report (filled as the iterator
    is consumed).

    Raises (while iterating):
      DataError: the file is unreadable or lacks the messages column (Parquet); or, when
        the source is strict, holds a bad record, is truncated or holds no records.
    """
    file_type = file_format(path) if self.format == 'auto' else self.format
    if file_type == 'jsonl':
      bad_records = BadRecords(path, 'line', self.strict)
      return self._jsonl(path, bad_records), bad_records
    bad_records = BadRecords(path, 'row', self.strict)
    return self._parquet(path, bad_records), bad_records

  def examples(
      self,
      path: str,
      tokenizer: Tokenizer,
      template: str,
      *,
      max_length: int = 0,
      prompt_loss: bool = False,
  ) -> tuple[Iterator[Example], BadRecords]:
    """The training examples of one file (see `chat.chat_example`): conversations the
    template refuses, cannot mask or that are longer than `max_length` are bad records."""
    conversations, bad_records = self.read(path)

    def examples():
      for conversation in conversations:
        try:
          ids, mask = chat.chat_example(
              tokenizer,
              template,
              conversation.messages,
              prompt_loss=prompt_loss,
              max_length=max_length,
          )
        except chat.ConversationError as e:
          bad_records.add(e.kind, conversation.position, str(e))
          continue
        yield Example(ids, mask, conversation.language, bad_records.location(conversation.position))

    return examples(), bad_records

  def _conversation(self, messages, code, language_of, bad_records, position):
    """The record as a Conversation, or None after reporting why it is bad."""
    if messages is None:
      bad_records.add(MISSING_FIELD, position, f'no {self.messages_field!r} (missing or null)')
      return None
    problem = check_messages(messages)
    if problem:
      kind, reason = problem
      bad_records.add(kind, position, reason)
      return None
    language = self.language
    if self.language_field:
      if not isinstance(code, str):
        bad_records.add(
            MISSING_FIELD, position, f'{self.language_field!r} is missing or not a string'
        )
        return None
      try:
        language = language_of(code)
      except ValueError as e:
        bad_records.add(UNKNOWN_LANGUAGE, position, str(e))
        return None
    kept = [{'role': m['role'], 'content': m['content']} for m in messages]
    return Conversation(kept, language, position)

  def _jsonl(self, path, bad_records):
    language_of = LanguageCache(self.language)
    for line_number, record in jsonl_records(path, bad_records, self.messages_field):
      conversation = self._conversation(
          record.get(self.messages_field),
          record.get(self.language_field) if self.language_field else None,
          language_of,
          bad_records,
          line_number,
      )
      if conversation is not None:
        yield conversation

  def _parquet(self, path, bad_records):
    language_of = LanguageCache(self.language)
    columns = [self.messages_field] + ([self.language_field] if self.language_field else [])
    schema_problem = (
        (lambda schema: language_column_problem(schema, self.language_field))
        if self.language_field
        else (lambda schema: None)
    )
    batches = parquet_batches(path, bad_records, columns, schema_problem, _PARQUET_BATCH_ROWS)
    for first_row, batch in batches:
      records = batch.column(0).to_pylist()
      codes = (
          batch.column(1).cast(pa.large_string()).to_pylist()
          if self.language_field
          else [None] * len(records)
      )
      for row, (messages, code) in enumerate(zip(records, codes), first_row):
        if isinstance(messages, (str, bytes)):  # a column of JSON text
          try:
            messages = parse_json(messages)
          except BadRecord as e:
            bad_records.add(e.kind, row, f'{self.messages_field!r}: {e.reason}')
            continue
        conversation = self._conversation(messages, code, language_of, bad_records, row)
        if conversation is not None:
          yield conversation


def read_examples(
    source: ConversationSource,
    paths: Sequence[str],
    tokenizer: Tokenizer,
    template: str,
    *,
    max_length: int = 0,
    prompt_loss: bool = False,
) -> tuple[list[Example], list[BadRecords], list[str]]:
  """All examples of `paths` in order, each file's bad-record report, and the warnings a
  user must hear (a file cut short, one without conversations); small sets."""
  examples, reports, warnings = [], [], []
  for path in paths:
    file_examples, bad_records = source.examples(
        path, tokenizer, template, max_length=max_length, prompt_loss=prompt_loss
    )
    file_examples = list(file_examples)  # the report is complete once they are read
    examples.extend(file_examples)
    reports.append(bad_records)
    warning = bad_records.warning(len(file_examples))
    if warning:
      warnings.append(warning)
  return examples, reports, warnings
