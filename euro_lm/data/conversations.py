"""Conversations from raw files (JSONL, plain or .gz/.zst, and Parquet), and training
examples from them.

One conversation per record: `{"messages": [{"role": ..., "content": ...}, ...]}` with roles
system, user, assistant and tool (results of an assistant's `tool_calls`), optionally the
tools' schemas (`tools`) and a language field. Files are read by
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
import pyarrow.parquet as pq

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
UNSUPPORTED_ROLE = 'unsupported_role'  # a role other than system/user/assistant/tool
BAD_ORDER = 'bad_order'  # a system message after the first, an assistant before any user,
# or a tool result with no tool call before it
NO_ASSISTANT = 'no_assistant'  # nothing to learn from
EMPTY_ASSISTANT = 'empty_assistant'  # an assistant turn with neither text nor tool calls

# Tool results: the role transformers' templates and OpenAI's format use.
TOOL = 'tool'
# Other names for tool results, refused with the name to use.
_OTHER_TOOL_ROLES = ('tool_results', 'ipython', 'function')
# The record's field with the tools' JSON schemas, passed to the template as `tools`.
TOOLS_FIELD = 'tools'
# Rows per Parquet batch: bounds memory whatever the row-group size.
_PARQUET_BATCH_ROWS = 256


class Conversation(NamedTuple):
  messages: list[dict]  # as the record has them (every field), checked by check_messages
  language: str  # canonical tag, or '' when the source names none
  position: int  # line (JSONL, from 1) or row (Parquet, from 0) in its file
  tools: list[dict] | None = None  # the record's tool schemas, for the template
  fields: dict | None = None  # the record's other fields, as read (with `keep_fields`)


class Example(NamedTuple):
  ids: np.ndarray  # int32 [length]
  loss_mask: np.ndarray  # int32 [length]: 1 where the token is a target that counts
  language: str
  location: str  # path:line or path row N


def check_messages(messages, prompt=False) -> tuple[str, str] | None:
  """(kind, reason) if `messages` is not a conversation euro_lm trains on (or, with
  `prompt`, one for a model to answer), else None.

  A conversation is a non-empty list of message objects, passed to the template with every
  field they have, as transformers passes them. Each has a role: system (only as the first
  message), user, assistant or tool (a tool's result, after an assistant message with
  `tool_calls`). The first message after a system one is a user's, and there is at least
  one assistant message. A content is a string or a list of text parts ({"type": "text",
  "text": ...}, which the template gets as they are: Mistral Small 3.1's takes its system
  prompt only so). An assistant message has text or `tool_calls` (a list of objects naming
  a function, {"type": "function", "function": {"name": ..., "arguments": ...}}), and its
  reasoning, if given (`reasoning_content`, `thinking` or `reasoning`), is a string.
  Whether turns must alternate is the template's to say (Mistral's and Gemma's do; their
  refusal is a template_error). A prompt needs no assistant message but ends with a user
  message or a tool result: what the answer follows.
  """
  if not isinstance(messages, list) or not messages:
    return BAD_MESSAGES, f'messages is a {type(messages).__name__}, not a non-empty list'
  assistants, users, calls_open = 0, 0, False
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      return BAD_MESSAGES, f'message {i} is a {type(message).__name__}, not an object'
    role = message.get('role')
    if role in _OTHER_TOOL_ROLES:
      return UNSUPPORTED_ROLE, f'message {i}: role {role!r}; tool results take role {TOOL!r}'
    if role not in (*chat.ROLES, TOOL):
      return UNSUPPORTED_ROLE, f'message {i}: role {role!r} is not one of {(*chat.ROLES, TOOL)}'
    tool_calls = message.get('tool_calls')
    problem = (
        _tool_calls_problem(tool_calls, role) if tool_calls is not None else None
    ) or _reasoning_problem(message, role)
    if problem:
      return BAD_MESSAGES, f'message {i}: {problem}'
    content = message.get('content')
    if content is None and tool_calls:
      content = ''
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
    problem = _unicode_problem(message)
    if problem:
      return INVALID_UTF8, f'message {i}: {problem}'
    if role == 'system' and i > 0:
      return BAD_ORDER, f'message {i}: a system message can only be the first'
    if role == TOOL and not calls_open:
      return BAD_ORDER, f'message {i}: a tool result with no tool call before it'
    if role != TOOL:
      calls_open = bool(tool_calls)
    users += role == 'user'
    if role == 'assistant':
      if not users:
        return BAD_ORDER, f'message {i}: an assistant message before any user message'
      if not content.strip() and not tool_calls:
        return EMPTY_ASSISTANT, f'message {i}: an assistant message with no text or tool call'
      assistants += 1
  if prompt:
    last = messages[-1].get('role')
    if last not in ('user', TOOL):
      return BAD_ORDER, (
          f'message {len(messages) - 1} has role {last!r}; a prompt ends with a user message '
          'or a tool result'
      )
    return None
  if not assistants:
    return NO_ASSISTANT, 'no assistant message: nothing to learn from'
  return None


def _tool_calls_problem(tool_calls, role) -> str | None:
  """Why a message's tool_calls are not a list of calls naming a function, or None."""
  if role != 'assistant':
    return f'tool_calls in a {role!r} message; only an assistant calls tools'
  if not isinstance(tool_calls, list):
    return f'tool_calls is a {type(tool_calls).__name__}, not a list'
  for j, call in enumerate(tool_calls):
    function = call.get('function') if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get('name'), str):
      return f'tool call {j} is not an object with a function and its name'
  return None


def _reasoning_problem(message, role) -> str | None:
  for field in chat.REASONING_FIELDS:
    value = message.get(field)
    if value is None:
      continue
    if role != 'assistant':
      return f'{field} in a {role!r} message; only an assistant reasons'
    if not isinstance(value, str):
      return f'{field} is a {type(value).__name__}, not a string'
  return None


def tools_problem(tools) -> tuple[str, str] | None:
  """(kind, reason) if a record's tools are not a list of objects (the tools' JSON
  schemas) in valid Unicode, else None."""
  if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
    return BAD_MESSAGES, f"{TOOLS_FIELD!r} is not a list of objects (the tools' JSON schemas)"
  problem = _unicode_problem(tools)
  return (INVALID_UTF8, f'{TOOLS_FIELD!r}: {problem}') if problem else None


def _unicode_problem(value) -> str | None:
  """Where a JSON value holds a string that is not valid Unicode (JSON escapes can spell
  lone surrogates), or None. Iterative: a record may nest as deep as JSON allows."""
  stack = [('', value)]
  while stack:
    where, value = stack.pop()
    if isinstance(value, str):
      try:
        value.encode('utf-8')
      except UnicodeEncodeError as e:
        return f'{where or "a string"} is not valid Unicode: {e}'
    elif isinstance(value, dict):
      stack.extend(('a key', k) for k in value)
      stack.extend((str(k), v) for k, v in value.items())
    elif isinstance(value, list):
      stack.extend((where, v) for v in value)
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
    prompts: the records are prompts for a model to answer (`check_messages`' `prompt`),
      not conversations to train on.
    keep_fields: each Conversation carries its record's other fields (Parquet: columns)
      in `fields`, so that a record can be written back with new messages.
  """

  format: str = 'auto'
  messages_field: str = 'messages'
  language_field: str = ''
  language: str = ''
  strict: bool = False
  prompts: bool = False
  keep_fields: bool = False

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
      variables: dict | None = None,
  ) -> tuple[Iterator[Example], BadRecords]:
    """The training examples of one file (see `chat.chat_example`), rendered with the
    template `variables` too: conversations the template refuses, cannot mask or that are
    longer than `max_length` are bad records."""
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
              tools=conversation.tools,
              **(variables or {}),
          )
        except chat.ConversationError as e:
          bad_records.add(e.kind, conversation.position, str(e))
          continue
        yield Example(ids, mask, conversation.language, bad_records.location(conversation.position))

    return examples(), bad_records

  def _conversation(self, messages, code, tools, language_of, bad_records, position, fields):
    """The record as a Conversation, or None after reporting why it is bad."""
    if messages is None:
      bad_records.add(MISSING_FIELD, position, f'no {self.messages_field!r} (missing or null)')
      return None
    problem = check_messages(messages, self.prompts)
    if problem is None and tools is not None:
      problem = tools_problem(tools)
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
    return Conversation(messages, language, position, tools, fields)

  def _jsonl(self, path, bad_records):
    language_of = LanguageCache(self.language)
    for line_number, record in jsonl_records(path, bad_records, self.messages_field):
      conversation = self._conversation(
          record.get(self.messages_field),
          record.get(self.language_field) if self.language_field else None,
          record.get(TOOLS_FIELD),
          language_of,
          bad_records,
          line_number,
          {k: v for k, v in record.items() if k != self.messages_field}
          if self.keep_fields
          else None,
      )
      if conversation is not None:
        yield conversation

  def _parquet(self, path, bad_records):
    language_of = LanguageCache(self.language)
    columns = [self.messages_field] + ([self.language_field] if self.language_field else [])
    names = _parquet_columns(path)
    with_tools = TOOLS_FIELD in names and TOOLS_FIELD not in columns
    if with_tools:
      columns.append(TOOLS_FIELD)
    others = [n for n in names if n != self.messages_field] if self.keep_fields else []
    columns += [n for n in others if n not in columns]
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
      tools = batch.column(columns.index(TOOLS_FIELD)).to_pylist() if with_tools else None
      values = {n: batch.column(columns.index(n)).to_pylist() for n in others}
      for k, (messages, code) in enumerate(zip(records, codes)):
        row = first_row + k
        try:
          messages = _json_text(messages, self.messages_field)
          row_tools = _json_text(tools[k], TOOLS_FIELD) if tools else None
        except BadRecord as e:
          bad_records.add(e.kind, row, e.reason)
          continue
        fields = {n: column[k] for n, column in values.items()} if self.keep_fields else None
        conversation = self._conversation(
            messages, code, row_tools, language_of, bad_records, row, fields
        )
        if conversation is not None:
          yield conversation


def _parquet_columns(path) -> list[str]:
  """The columns of a Parquet file; none where it cannot be read (its reader says why)."""
  try:
    return pq.read_schema(path).names
  except (OSError, pa.ArrowException):
    return []


def _json_text(value, column):
  """A Parquet cell as it is, or parsed where the column holds JSON text.

  Raises:
    BadRecord: invalid JSON text, its reason naming `column`.
  """
  if not isinstance(value, (str, bytes)):
    return value
  try:
    return parse_json(value)
  except BadRecord as e:
    raise BadRecord(e.kind, f'{column!r}: {e.reason}') from None


def read_examples(
    source: ConversationSource,
    paths: Sequence[str],
    tokenizer: Tokenizer,
    template: str,
    *,
    max_length: int = 0,
    prompt_loss: bool = False,
    variables: dict | None = None,
) -> tuple[list[Example], list[BadRecords], list[str]]:
  """All examples of `paths` in order, each file's bad-record report, and the warnings a
  user must hear (a file cut short, one without conversations); small sets."""
  examples, reports, warnings = [], [], []
  for path in paths:
    file_examples, bad_records = source.examples(
        path,
        tokenizer,
        template,
        max_length=max_length,
        prompt_loss=prompt_loss,
        variables=variables,
    )
    file_examples = list(file_examples)  # the report is complete once they are read
    examples.extend(file_examples)
    reports.append(bad_records)
    warning = bad_records.warning(len(file_examples))
    if warning:
      warnings.append(warning)
  return examples, reports, warnings
