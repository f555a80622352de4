"""Text generation from a training run's checkpoint, with a KV cache.

`python -m euro_lm.generate --workdir=DIR --prompt "Once" [--prompt "Il était"]
[--max_new_tokens=64] [--temperature=0.8] [--top_k=0] [--top_p=0.95] [--seed=0] [--step=N]
[--batch_size=32] [--output=FILE.jsonl]
[--chat [--system=TEXT] [--tools=FILE] [--chat_template_kwargs=JSON]]`
`python -m euro_lm.generate --workdir=DIR --conversations=FILE [--chat_template_kwargs=JSON]
[--batch_size=32] [--output=FILE.jsonl] [sampling flags]`

Prompts run `--batch_size` at a time, in order, as left-padded batches; batch k samples
with `fold_in(key(seed), k)`, so an answer depends on the seed, the batch size and its
batch's prompts, not on the rest of the file; `--temperature=0` is greedy, the same at
any batch size. With `--chat` each prompt is a user message in the run's chat template;
`--conversations` answers each record of a JSONL or Parquet file in the training data's
format (`messages`, optionally `tools`) that ends with a user message or a tool result (it
implies `--chat`). The template gets the run's data.chat_template_kwargs, updated with
`--chat_template_kwargs`.

Answers go to stdout, or with `--output` to a new JSONL file in input order: a record's
own fields with the answer appended to its messages as an assistant message (chat data
again), `{"prompt", "completion"}` for a `--prompt`, the messages for a `--chat` prompt.
The file is written as `FILE.tmp` (flushed after each batch; kept, and named, when the
run fails) and renamed to FILE at the end; an existing FILE or FILE.tmp is refused.
Progress goes to stderr. Library use: `euro_lm.inference.load_run(workdir)` then
`complete(run, prompts, ...)` or `answer(run, conversations, ...)`.
"""

import datetime
import decimal
import json
import os
import sys

from absl import app, flags, logging

from euro_lm import cli
from euro_lm.data import chat
from euro_lm.data.conversations import ConversationSource, tools_problem
from euro_lm.errors import UserError
from euro_lm.inference import SAMPLING, answer, complete, load_run, user_turn

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'A prompt; repeat for several.')
_MAX_NEW = flags.DEFINE_integer(
    'max_new_tokens', SAMPLING['max_new_tokens'], 'Most new tokens per prompt.'
)
_TEMPERATURE = flags.DEFINE_float(
    'temperature', SAMPLING['temperature'], 'Sampling temperature; 0 is greedy.'
)
_TOP_K = flags.DEFINE_integer(
    'top_k', SAMPLING['top_k'], 'Sample among the k most likely tokens; 0 is off.'
)
_TOP_P = flags.DEFINE_float('top_p', SAMPLING['top_p'], 'Nucleus sampling mass; 1 is off.')
_SEED = flags.DEFINE_integer('seed', SAMPLING['seed'], 'PRNG seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest.')
_CHAT = flags.DEFINE_bool(
    'chat',
    False,
    "Each prompt is a user message in the run's chat template; answers end at its turn end.",
)
_SYSTEM = flags.DEFINE_string('system', '', 'With --chat: a system message before each prompt.')
_TOOLS = flags.DEFINE_string(
    'tools', None, "With --chat: a JSON file with a list of tool schemas for the template's tools."
)
_TEMPLATE_KWARGS = flags.DEFINE_string(
    'chat_template_kwargs',
    '',
    "Template variables, a JSON object such as '{\"enable_thinking\": false}', over the run's"
    ' data.chat_template_kwargs.',
)
_CONVERSATIONS = flags.DEFINE_string(
    'conversations',
    None,
    'A JSONL or Parquet file of conversations to answer (as chat training data: messages, '
    'optionally tools), each ending with a user message or a tool result.',
)
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 32, 'Prompts answered at a time (the rows of one KV cache), in order.'
)
_OUTPUT = flags.DEFINE_string(
    'output',
    None,
    'Write the answers to this new JSONL file (refused if it exists), in input order, '
    'instead of stdout; written as FILE.tmp (refused if it exists: the answers of a run '
    'that stopped), renamed at the end.',
)


def _read_tools(path):
  """The list of tool schemas in the JSON file `path`.

  Raises:
    UserError: the file is not JSON, or not a list of objects.
  """
  with open(path, 'rb') as f:
    data = f.read()
  try:
    tools = json.loads(data.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise UserError(f'{path}: not UTF-8 text (byte {e.start})') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path}: line {e.lineno}: not JSON: {e.msg}') from None
  problem = tools_problem(tools)
  if problem:
    raise UserError(f'{path}: {problem[1]}')
  return tools


def _check_flags():
  if not _WORKDIR.value:
    raise UserError('give --workdir')
  if _BATCH_SIZE.value < 1:
    raise UserError(f'--batch_size={_BATCH_SIZE.value} must be >= 1')
  if _CONVERSATIONS.value:
    given = [f'--{n}' for n, v in (('prompt', _PROMPT.value), ('system', _SYSTEM.value)) if v]
    given += ['--tools'] if _TOOLS.value else []
    if given:
      raise UserError(
          f'--conversations takes no {" or ".join(given)}: each record has its own messages '
          'and tools'
      )
    return
  if not _PROMPT.value:
    raise UserError('give at least one --prompt, or --conversations')
  if (_SYSTEM.value or _TOOLS.value or _TEMPLATE_KWARGS.value) and not _CHAT.value:
    raise UserError('--system, --tools and --chat_template_kwargs need --chat')


class _AnswerFile:
  """A JSONL file of answers that appears under its name only once complete: records go to
  `<path>.tmp`, flushed after each batch, and `close` renames it to `path`."""

  def __init__(self, path):
    """Refuses an existing `path` or `.tmp` file, or a missing folder, before any work."""
    self.path, self.tmp = path, path + '.tmp'
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
      raise UserError(f'--output={path} exists: remove it or choose another name')
    if os.path.lexists(self.tmp):
      raise UserError(
          f'--output={path}: {self.tmp} exists, the answers of a run that stopped: move '
          'it away or remove it'
      )
    if not os.path.isdir(folder):
      raise UserError(f'--output={path}: no directory {folder}')
    self.file = open(self.tmp, 'w', encoding='utf-8')  # an unwritable folder fails here
    self.count = 0

  def write(self, records):
    """Appends one JSON line per record (a Parquet date, time or decimal as its text) and
    flushes them; refuses a value JSON cannot hold (NaN, bytes)."""
    for record in records:
      try:
        line = json.dumps(record, ensure_ascii=False, allow_nan=False, default=_as_text)
      except (TypeError, ValueError) as e:
        what = e if isinstance(e, TypeError) else 'NaN or infinity'  # json's ValueError
        raise UserError(
            f'--output={self.path}: answer {self.count + 1} has a field JSON cannot hold: {what}'
        ) from None
      self.file.write(line + '\n')
      self.count += 1
    self.file.flush()

  def close(self):
    """Moves the finished file to its name; raises, keeping it, if that name appeared."""
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    if os.path.lexists(self.path):
      raise UserError(f'--output={self.path} appeared meanwhile: the answers are in {self.tmp}')
    os.replace(self.tmp, self.path)

  def abandon(self):
    """After a failure: keeps the answers written so far in the .tmp file, and says so;
    else removes it."""
    self.file.close()
    if os.path.getsize(self.tmp):
      print(f'warning: the answers written so far are kept in {self.tmp}', file=sys.stderr)
    else:
      os.remove(self.tmp)


def _as_text(value):
  """A date, time or decimal (Parquet columns) as JSON text; refuses anything else."""
  if isinstance(value, (datetime.date, datetime.time)):
    return value.isoformat()
  if isinstance(value, decimal.Decimal):
    return str(value)
  raise TypeError(f'a {type(value).__name__} value')


def _answers(count):
  """'1 answer', '2 answers'."""
  return f'{count} answer' + ('s' if count != 1 else '')


def _answered(conversation, text):
  """The record of `conversation` with `text` appended to its messages: chat data again."""
  messages = [*conversation.messages, {'role': 'assistant', 'content': text}]
  record = {'messages': messages, **(conversation.fields or {})}
  if conversation.tools is not None:
    record['tools'] = conversation.tools  # as read: a Parquet cell may hold JSON text
  return record


def _prompt_record(prompt, text, tools):
  """A `--prompt`'s answer as a record: its messages with `--chat`, else prompt and
  completion."""
  if not _CHAT.value:
    return {'prompt': prompt, 'completion': text}
  messages = [*user_turn(prompt, _SYSTEM.value), {'role': 'assistant', 'content': text}]
  return {'messages': messages, **({'tools': tools} if tools is not None else {})}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  _check_flags()
  variables = chat.template_variables(_TEMPLATE_KWARGS.value, '--chat_template_kwargs')
  out = _AnswerFile(_OUTPUT.value) if _OUTPUT.value else None
  try:
    count, step_dir = _generate(variables, out)
  except BaseException:
    if out:
      out.abandon()
    raise
  if out:
    out.close()
    print(f'wrote {_answers(count)} of {step_dir} to {out.path}')


def _generate(variables, out):
  """Answers every prompt, batch by batch, into `out` or onto stdout; returns (the number
  of answers, the checkpoint)."""
  if _CONVERSATIONS.value:
    # Strict: the first bad record stops the command, named by file and line (or row).
    source = ConversationSource(prompts=True, strict=True, keep_fields=True)
    records, bad_records = source.read(_CONVERSATIONS.value)
    inputs = list(records)
    to_record = _answered
    to_text = lambda c, text: f'--- {bad_records.location(c.position)}\n{text}'
  else:
    tools = _read_tools(_TOOLS.value) if _TOOLS.value else None
    inputs = _PROMPT.value
    to_record = lambda prompt, text: _prompt_record(prompt, text, tools)
    to_text = lambda p, text: f'--- {p!r}\n{text}' if _CHAT.value else f'--- {p!r}\n{p}{text}'
  run = load_run(_WORKDIR.value, _STEP.value)
  if not out:
    print(f'# {run.step_dir}')
  done = 0

  def on_batch(k, batches, texts):
    nonlocal done
    pairs = list(zip(inputs[done : done + len(texts)], texts))
    done += len(texts)
    if out:
      out.write([to_record(*pair) for pair in pairs])
    else:
      print('\n'.join(to_text(*pair) for pair in pairs), flush=True)
    print(f'batch {k + 1}/{batches}: {_answers(len(texts))}', file=sys.stderr, flush=True)

  sampling = dict(
      max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
      batch_size=_BATCH_SIZE.value,
      on_batch=on_batch,
  )
  if _CONVERSATIONS.value:
    answer(
        run,
        [c.messages for c in inputs],
        tools=[c.tools for c in inputs],
        names=[bad_records.location(c.position) for c in inputs],
        template_variables=variables,
        **sampling,
    )
  else:
    complete(
        run,
        inputs,
        chat_messages=_CHAT.value,
        system=_SYSTEM.value,
        tools=tools,
        template_variables=variables if _CHAT.value else None,
        **sampling,
    )
  return done, run.step_dir


if __name__ == '__main__':
  cli.run(main)
