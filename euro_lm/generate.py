"""Text generation from a training run's checkpoint, with a KV cache.

`python -m euro_lm.generate --workdir=DIR --prompt "Once" [--prompt "Il était"]
[--max_new_tokens=64] [--temperature=0.8] [--top_k=0] [--top_p=0.95] [--seed=0] [--step=N]
[--chat [--system=TEXT] [--tools=FILE] [--chat_template_kwargs=JSON]]`
`python -m euro_lm.generate --workdir=DIR --conversations=FILE [--chat_template_kwargs=JSON]
[sampling flags]`

All prompts run as one left-padded batch; `--temperature=0` is greedy. With `--chat` each
prompt is a user message in the run's chat template; `--conversations` answers each record
of a JSONL or Parquet file in the training data's format (`messages`, optionally `tools`)
that ends with a user message or a tool result (it implies `--chat`). The template gets
the run's data.chat_template_kwargs, updated with `--chat_template_kwargs`. Library use:
`euro_lm.inference.load_run(workdir)` then `complete(run, prompts, ...)` or
`answer(run, conversations, ...)`.
"""

import json

from absl import app, flags, logging

from euro_lm import cli
from euro_lm.data import chat
from euro_lm.data.conversations import ConversationSource, tools_problem
from euro_lm.errors import UserError
from euro_lm.inference import answer, complete, load_run

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'A prompt; repeat for a batch.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Most new tokens per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 is off.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass; 1 is off.')
_SEED = flags.DEFINE_integer('seed', 0, 'PRNG seed.')
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  _check_flags()
  variables = chat.template_variables(_TEMPLATE_KWARGS.value, '--chat_template_kwargs')
  sampling = dict(
      max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
  )
  if _CONVERSATIONS.value:
    # Strict: the first bad record stops the command, named by file and line (or row).
    records, bad_records = ConversationSource(prompts=True, strict=True).read(_CONVERSATIONS.value)
    records = list(records)
    run = load_run(_WORKDIR.value, _STEP.value)
    names = [bad_records.location(c.position) for c in records]
    messages, tools = [c.messages for c in records], [c.tools for c in records]
    texts = answer(
        run, messages, tools=tools, names=names, template_variables=variables, **sampling
    )
    print(f'# {run.step_dir}')
    for name, text in zip(names, texts):
      print(f'--- {name}\n{text}')
    return
  tools = _read_tools(_TOOLS.value) if _TOOLS.value else None
  run = load_run(_WORKDIR.value, _STEP.value)
  texts = complete(
      run,
      _PROMPT.value,
      chat_messages=_CHAT.value,
      system=_SYSTEM.value,
      tools=tools,
      template_variables=variables if _CHAT.value else None,
      **sampling,
  )
  print(f'# {run.step_dir}')
  for prompt, text in zip(_PROMPT.value, texts):
    print(f'--- {prompt!r}\n{text}' if _CHAT.value else f'--- {prompt!r}\n{prompt}{text}')


if __name__ == '__main__':
  cli.run(main)
