"""`python -m euro_lm.bench.chat_templates --templates=DIR --tokenizer=DIR`

Chat templates (`DIR/*.jinja`, e.g. the published ones llama.cpp ships in
`models/templates/`) through euro_lm's rendering and loss masks, on four conversations:
`plain` (one exchange), `multi` (a system message and two exchanges), `tool` (a tool call,
its result and the answer) and `reason` (two exchanges with reasoning). Per template and
conversation, with and without a generation prompt: whether the text equals transformers'
`apply_chat_template` (`=`), or both refuse it (`e`), or they differ (`X`); and what
`chat.chat_example` makes of it: `.` masked, `e` a template_error (the template refuses the
conversation, or leaves out what a message says), `U` unmaskable.

The tokenizer folder (a tokenizer.json) stands in for each template's own: the markers the
template writes (`<|im_end|>`, `[INST]`, `<turn|>`, ...) are added to a copy of it as
special tokens, as a model's own tokenizer has them. Where a template writes a marker this
misses, a token can span a turn's edge (`U`) that the model's own tokenizer would not.
Prints one table and the counts.
"""

import glob
import os
import re
import shutil
import tempfile
from collections import Counter

from absl import app, flags

from euro_lm import cli
from euro_lm.data import chat
from euro_lm.data.tokenizer import load_tokenizer

_TEMPLATES = flags.DEFINE_string('templates', None, 'A directory of *.jinja chat templates.')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, "A tokenizer.json folder to stand in for each template's own."
)

# Special-token-like strings a template writes: <|im_end|>, <｜User｜>, <turn|>, </s>, [INST].
_MARKER = re.compile(r"<[|｜]?[^<>\s'\"|｜]+[|｜]?>|\[/?[A-Z_]+\]")

_TOOLS = [
    {
        'type': 'function',
        'function': {
            'name': 'wetter',
            'description': 'Das Wetter einer Stadt',
            'parameters': {
                'type': 'object',
                'properties': {'stadt': {'type': 'string', 'description': 'Die Stadt'}},
                'required': ['stadt'],
            },
        },
    }
]
_CALL = {
    'id': 'call00001',
    'type': 'function',
    'function': {'name': 'wetter', 'arguments': {'stadt': 'Zürich'}},
}
CONVERSATIONS = {
    'plain': (
        [{'role': 'user', 'content': 'Hola'}, {'role': 'assistant', 'content': '¡Hola! ¿Qué tal?'}],
        {},
    ),
    'multi': (
        [
            {'role': 'system', 'content': 'Sei un assistente utile.'},
            {'role': 'user', 'content': 'Quanto fa 2 + 2?'},
            {'role': 'assistant', 'content': 'Quattro.'},
            {'role': 'user', 'content': 'E 3 + 3?'},
            {'role': 'assistant', 'content': 'Sei.'},
        ],
        {},
    ),
    'tool': (
        [
            {'role': 'user', 'content': 'Wie ist das Wetter in Zürich?'},
            {'role': 'assistant', 'content': '', 'tool_calls': [_CALL]},
            {'role': 'tool', 'tool_call_id': 'call00001', 'name': 'wetter', 'content': '3 °C'},
            {'role': 'assistant', 'content': 'In Zürich sind es 3 °C.'},
        ],
        {'tools': _TOOLS},
    ),
    'reason': (
        [
            {'role': 'user', 'content': 'Combien font 2 + 2 ?'},
            {'role': 'assistant', 'content': 'Quatre.', 'reasoning_content': 'Deux et deux.'},
            {'role': 'user', 'content': 'Et 3 + 3 ?'},
            {'role': 'assistant', 'content': 'Six.', 'reasoning_content': 'Trois et trois.'},
        ],
        {},
    ),
}
_KINDS = {chat.TEMPLATE_ERROR: 'e', chat.UNMASKABLE: 'U', chat.TOO_LONG: 'L'}


def stand_in_tokenizer(template: str, tokenizer_dir: str, output: str) -> str:
  """A copy of `tokenizer_dir` in `output` with the template's markers as special tokens."""
  import tokenizers  # pylint: disable=import-outside-toplevel

  shutil.copytree(tokenizer_dir, output)
  path = os.path.join(output, 'tokenizer.json')
  tokenizer = tokenizers.Tokenizer.from_file(path)
  markers = sorted(set(_MARKER.findall(template)))
  tokenizer.add_special_tokens(
      [tokenizers.AddedToken(m, special=True, normalized=False) for m in markers]
  )
  tokenizer.save(path)
  return output


def rendering(theirs, ours, template, messages, variables) -> str:
  """'=' (equal text or both refuse, with and without a generation prompt), else 'X'."""
  for prompt in (False, True):
    try:
      expected = theirs.apply_chat_template(
          messages,
          chat_template=template,
          tokenize=False,
          add_generation_prompt=prompt,
          **variables,
      )
    except Exception:  # pylint: disable=broad-except
      expected = None
    try:
      got = chat.render_chat(ours, template, messages, prompt, **variables)
    except chat.ConversationError:
      got = None
    if got != expected:
      return 'X'
  return '=' if expected is not None else 'e'


def masking(ours, template, messages, variables) -> str:
  try:
    chat.chat_example(ours, template, messages, **variables)
  except chat.ConversationError as e:
    return _KINDS[e.kind]
  return '.'


def table(templates_dir: str, tokenizer_dir: str) -> tuple[list[str], Counter, Counter]:
  """The table's lines and the counts of rendering and masking outcomes."""
  import transformers  # pylint: disable=import-outside-toplevel

  paths = sorted(glob.glob(os.path.join(templates_dir, '*.jinja')))
  if not paths:
    raise app.UsageError(f'--templates={templates_dir!r} holds no *.jinja file')
  if not os.path.isfile(os.path.join(tokenizer_dir, 'tokenizer.json')):
    raise app.UsageError(f'--tokenizer={tokenizer_dir!r} holds no tokenizer.json')
  lines = [
      '| template | ' + ' | '.join(CONVERSATIONS) + ' | masks |',
      '|---|' + '---|' * (len(CONVERSATIONS) + 1),
  ]
  renders, masks = Counter(), Counter()
  with tempfile.TemporaryDirectory() as scratch:
    for k, path in enumerate(paths):
      with open(path, encoding='utf-8') as f:
        template = f.read()
      folder = stand_in_tokenizer(template, tokenizer_dir, os.path.join(scratch, str(k)))
      theirs = transformers.AutoTokenizer.from_pretrained(folder)
      ours = load_tokenizer(folder)
      cells, row = [], ''
      for messages, variables in CONVERSATIONS.values():
        same = rendering(theirs, ours, template, messages, variables)
        mask = masking(ours, template, messages, variables)
        renders[same] += 1
        masks[mask] += 1
        cells.append(f'{same}{mask}')
        row += mask
      name = os.path.basename(path).removesuffix('.jinja')
      lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {row} |')
  return lines, renders, masks


def main(argv):
  del argv
  if not _TEMPLATES.value or not _TOKENIZER.value:
    raise app.UsageError('--templates and --tokenizer are required')
  lines, renders, masks = table(_TEMPLATES.value, _TOKENIZER.value)
  print('\n'.join(lines))
  print(
      f'\n{len(lines) - 2} templates x {len(CONVERSATIONS)} conversations. Rendering (with and'
      f' without a generation prompt): equal to transformers {renders["="]}, both refuse'
      f' {renders["e"]}, different {renders["X"]}. Masks: masked {masks["."]}, template_error'
      f' {masks["e"]}, unmaskable {masks["U"]}.'
  )


if __name__ == '__main__':
  cli.run(main)
