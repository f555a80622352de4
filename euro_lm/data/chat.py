"""Chat templates: a conversation rendered and tokenized exactly as transformers'
`apply_chat_template` does, and a loss mask that covers what the assistant says.

A template is the Jinja string a tokenizer folder ships. It is rendered with transformers'
engine settings (a sandboxed, immutable Jinja environment with trim_blocks, lstrip_blocks,
loop controls, its `tojson`, `raise_exception`, `strftime_now`, `dict` and `namespace`), with
the tokenizer's named special tokens (`bos_token`, ...) as variables, and the text is encoded
without adding special tokens: the template writes them.

The mask is 1 on the tokens of each assistant turn as the template renders it after the
generation prompt (`<|im_start|>assistant\\n`, `<start_of_turn>model\\n`, ...): the content
and the end-of-turn marker that ends it (`<|im_end|>`, `<|eot_id|>`, `</s>`), up to trailing
whitespace. That is what a template's `{% generation %}` block marks in common SFT practice
(TRL's assistant_only_loss), found for any template: the turn of message i is the text
between `render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])`,
which must both be prefixes of the whole rendering; characters map to tokens by the
tokenizer's offsets. Where a template's renderings are not prefixes of the whole (Qwen3's,
Phi-3.5's, DeepSeek-R1's), the turn is located in the whole rendering by probes instead (see
`assistant_spans`). A token across a turn's edge is the turn's, as transformers' assistant
masks count it. A turn found neither way, or a rendering that leaves out what a message
says, is refused with the reason, never masked by a guess.
"""

import bisect
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from euro_lm.data.tokenizer import Tokenizer, copy_files, file_names
from euro_lm.errors import ConfigError, DataError, read_json_object

ROLES = ('system', 'user', 'assistant')

# The template for models trained from scratch: ChatML, after the tokenizer's BOS (as every
# pretraining document starts) when it has one. Generation stops at <|im_end|>.
DEFAULT_TEMPLATE = (
    '{{ bos_token }}'
    '{% for message in messages %}'
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The markers DEFAULT_TEMPLATE writes; each must be one id of the tokenizer (add_chat_tokens).
DEFAULT_TEMPLATE_TOKENS = ('<|im_start|>', '<|im_end|>')

# Where transformers 5 reads a folder's templates (AutoTokenizer.from_pretrained).
TEMPLATE_FILE = 'chat_template.jinja'
TEMPLATE_DIR = 'additional_chat_templates'
TOKENIZER_CONFIG = 'tokenizer_config.json'
# A processor's (multimodal model's) legacy file, which AutoTokenizer ignores: read last.
PROCESSOR_TEMPLATE_FILE = 'chat_template.json'

# Kinds of conversations that cannot become training examples (counted as bad records).
TEMPLATE_ERROR = 'template_error'
UNMASKABLE = 'unmaskable'
TOO_LONG = 'too_long'


class ConversationError(DataError):
  """A conversation that cannot become a training example; `kind` names why in one word."""

  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind = kind


def load_chat_template(directory: str, name: str = '') -> str | None:
  """The chat template of a tokenizer folder as AutoTokenizer picks it, or None.

  Files before the config: `chat_template.jinja` (the default) and
  `additional_chat_templates/<name>.jinja`; else tokenizer_config.json's `chat_template`
  (a string, or a list of {name, template}); else a processor's `chat_template.json`.
  With several templates, `name` picks one, else 'default'.

  Raises:
    DataError: an unreadable file, or several templates and none named `name` or 'default'.
  """
  templates = {}
  default_file = os.path.join(directory, TEMPLATE_FILE)
  if os.path.isfile(default_file):
    templates['default'] = _read(default_file)
  extra = os.path.join(directory, TEMPLATE_DIR)
  if os.path.isdir(extra):
    for file in sorted(os.listdir(extra)):
      if file.endswith('.jinja'):
        templates[file.removesuffix('.jinja')] = _read(os.path.join(extra, file))
  source = os.path.join(directory, TEMPLATE_DIR if templates else TOKENIZER_CONFIG)
  if not templates:
    for file in (TOKENIZER_CONFIG, PROCESSOR_TEMPLATE_FILE):
      path = os.path.join(directory, file)
      value = (
          read_json_object(path, DataError).get('chat_template') if os.path.isfile(path) else None
      )
      if value is None:
        continue
      source = path
      if isinstance(value, str):
        templates['default'] = value
      elif isinstance(value, list) and all(
          isinstance(t, dict)
          and isinstance(t.get('name'), str)
          and isinstance(t.get('template'), str)
          for t in value
      ):
        templates = {t['name']: t['template'] for t in value}
      else:
        raise DataError(
            f'{path}: chat_template is neither a string nor a list of {{name, template}}'
        )
      break
  if not templates:
    return None
  if set(templates) == {'default'} and not name:
    return templates['default']
  chosen = name or 'default'
  if chosen not in templates:
    raise DataError(
        f'{source}: no chat template named {chosen!r}; the folder has {sorted(templates)}'
    )
  return templates[chosen]


def _read(path):
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: unreadable chat template: {e}') from e


def template_named(name: str, tokenizer: Tokenizer, field: str) -> str:
  """The template a setting `field` (data.chat_template, --chat_template) names: '' the
  tokenizer folder's (else the default, see `chat_template_for`), 'default', or a Jinja
  file's text.

  Raises:
    ConfigError: the file cannot be read, or the template is not valid Jinja (naming
      `field`): one error before any conversation, not a bad record for each.
  """
  if name == 'default':
    return DEFAULT_TEMPLATE
  if not name:
    template = chat_template_for(tokenizer)
  else:
    try:
      with open(name, encoding='utf-8') as f:
        template = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f'{field}={name!r}: cannot read it: {e}') from None
  try:
    compile_template(template)
  except ConfigError as e:
    where = f'{field}={name!r}' if name else f"{field}='' (the tokenizer folder's template)"
    raise ConfigError(f'{where}: {e}') from None
  return template


def template_fingerprint(template: str, variables: dict | None = None) -> str:
  """The sha256 of a template's text and the variables it is rendered with (none: of the
  text alone): what a prepared directory and a run compare."""
  text = template + (f'\0{json.dumps(variables, sort_keys=True)}' if variables else '')
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


# What a conversation gives the template, and apply_chat_template's own parameters: not
# template variables (transformers would not pass them to the template either).
_RESERVED_VARIABLES = (
    'messages',
    'add_generation_prompt',
    'tools',
    'documents',
    'continue_final_message',
    'chat_template',
    'tokenize',
    'padding',
    'truncation',
    'max_length',
    'return_tensors',
    'return_dict',
    'return_assistant_tokens_mask',
    'tokenizer_kwargs',
)


def template_variables(text: str, field: str) -> dict:
  """The variables a setting `field` (data.chat_template_kwargs, --chat_template_kwargs)
  gives every rendering, as transformers' `apply_chat_template(**kwargs)` and serving
  stacks' `chat_template_kwargs` do: a JSON object such as '{"enable_thinking": false}'
  (Qwen3's switch); '' none.

  Raises:
    ConfigError: not a JSON object, or one that sets what each conversation gives.
  """
  if not text:
    return {}
  try:
    variables = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f'{field}={text!r} is not JSON: {e.msg}') from None
  if not isinstance(variables, dict):
    raise ConfigError(f'{field}={text!r} is not a JSON object of template variables')
  reserved = [k for k in _RESERVED_VARIABLES if k in variables]
  if reserved:
    raise ConfigError(
        f'{field} sets {reserved[0]!r}, which is not a template variable of its own'
        + (" (tools are each record's tools field)" if reserved[0] == 'tools' else '')
    )
  return variables


def missing_tokens(tokenizer: Tokenizer, tokens: Sequence[str] = DEFAULT_TEMPLATE_TOKENS):
  """Those of `tokens` the tokenizer does not encode as one id."""
  return [t for t in tokens if len(tokenizer.encode_offsets(t)[0]) != 1]


def chat_template_for(tokenizer: Tokenizer, template: str = '') -> str:
  """The template to render with: `template` if given (a Jinja string), else the one in the
  tokenizer's folder, else DEFAULT_TEMPLATE.

  Raises:
    ConfigError: DEFAULT_TEMPLATE would be used but its markers are not single ids of the
      tokenizer (add them with `add_chat_tokens`).
  """
  if template:
    return template
  found = load_chat_template(os.path.dirname(os.path.abspath(tokenizer.files[0])))
  if found is not None:
    return found
  missing = missing_tokens(tokenizer)
  if missing:
    raise ConfigError(
        f'The tokenizer {tokenizer.path} has no chat template, and the default template needs'
        f' {missing} as single tokens; add them with euro_lm.data.chat.add_chat_tokens (the'
        ' embeddings then need their new rows) or give a template.'
    )
  return DEFAULT_TEMPLATE


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: parsed and rendered as its body, as
  transformers does when it is not asked for masks (ours come from `assistant_spans`)."""

  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _Namespace(jinja2.utils.Namespace):
  """jinja2's namespace without underscore attributes (transformers' sandbox rule)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attributes = dict(*args, **kwargs)
    for name in attributes:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attributes)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith('_'):
      raise jinja2.exceptions.SecurityError(f'namespace attribute {name!r} starts with _')


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers' filter: Jinja's own escapes HTML characters.
  return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


def _strftime_now(format_):
  return datetime.now().strftime(format_)


class _TemplateDict:
  """transformers' `dict` for templates: dict(...) and dict.fromkeys(...), no more of the
  type (attribute access on it is a sandbox escape)."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


# A message's reasoning, under the names templates read: transformers fills each from any.
REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')


def _with_reasoning_aliases(message: dict) -> dict:
  reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
  if reasoning is None:
    return message
  return {'thinking': reasoning, **message, 'reasoning_content': reasoning}


@functools.lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
  """The template compiled in transformers' environment.

  Raises:
    ConfigError: the template is not valid Jinja.
  """
  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
  )
  environment.filters['tojson'] = _tojson
  environment.globals.update(
      raise_exception=_raise_exception,
      strftime_now=_strftime_now,
      dict=_TemplateDict(),
      namespace=_Namespace,
  )
  try:
    return environment.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ConfigError(f'The chat template is not valid Jinja (line {e.lineno}): {e.message}') from e


def render_chat(
    tokenizer: Tokenizer,
    template: str,
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    **variables,
) -> str:
  """The text `apply_chat_template(messages, tokenize=False, **variables)` gives.

  Raises:
    ConversationError (kind 'template_error'): the template refused the messages.
  """
  # transformers drops None values: templates test for a key, not for None.
  messages = [
      _with_reasoning_aliases({k: v for k, v in m.items() if v is not None}) for m in messages
  ]
  variables = {'tools': None, 'documents': None, **tokenizer.special_tokens, **variables}
  try:
    text = compile_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )
  except Exception as e:  # the template is the folder's code: any failure is this conversation's
    raise ConversationError(TEMPLATE_ERROR, f'the chat template refused it: {e}') from e
  try:
    text.encode('utf-8')  # JSON escapes can spell lone surrogates, in any field it writes
  except UnicodeEncodeError as e:
    raise ConversationError(TEMPLATE_ERROR, f'the rendering is not valid Unicode: {e}') from None
  for i, message in enumerate(messages):
    # A template written for string content turns a list of parts into Python's text of it
    # (transformers too); refused rather than trained on.
    content = message.get('content')
    if isinstance(content, list) and content and str(content[0]) in text:
      raise ConversationError(
          TEMPLATE_ERROR,
          f'message {i}: the chat template writes its content list out as Python text '
          f'({str(content[0])[:40]}...); it takes the content as a string',
      )
  return text


def encode_chat(
    tokenizer: Tokenizer,
    template: str,
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    **variables,
) -> list[int]:
  """`apply_chat_template(messages, tokenize=True, **variables)['input_ids']`.

  Raises:
    ConversationError: the template refused the messages.
  """
  text = render_chat(tokenizer, template, messages, add_generation_prompt, **variables)
  return tokenizer.encode_offsets(text)[0]


def encode_prompt(
    tokenizer: Tokenizer, template: str, messages: Sequence[dict], tools=None, **variables
) -> list[int]:
  """The ids a model answers `messages` from: `encode_chat` with the generation prompt,
  `tools` and the template `variables`, refused where the rendering leaves out what a
  message says (as for training; earlier turns' reasoning the template may drop by design).

  Raises:
    ConversationError (template_error): the template refused the messages or left some out.
  """
  text = render_chat(tokenizer, template, messages, True, tools=tools, **variables)
  _check_texts_rendered(messages, text, tools, prompt=True)
  return tokenizer.encode_offsets(text)[0]


def assistant_spans(
    tokenizer: Tokenizer, template: str, messages: Sequence[dict], **variables
) -> tuple[str, list[tuple[int, int]]]:
  """The whole rendering and the (start, end) character span of each assistant turn in it:
  after its generation prompt, up to the end of the turn less trailing whitespace.

  A turn is found from prefixes (see the module docstring) where the template renders the
  conversation up to it as a prefix of the whole. Where it does not (a template that moves
  the system message into the last user turn, ends a rendering with EOS, or drops earlier
  turns' reasoning), the turn is found in the whole rendering by probes: its content (or,
  for tool calls alone, its first call's name) is where a marker put inside it appears, its
  start after the generation prompt that precedes it, its end after the closing text the
  template writes after it as a last turn (as far as the whole rendering has it, on token
  edges).

  Raises:
    ConversationError: the template refused the messages, or a turn cannot be located.
  """
  text = render_chat(tokenizer, template, messages, **variables)
  _check_texts_rendered(messages, text, variables.get('tools'))
  token_ends = functools.cache(lambda: [b for _, b in tokenizer.encode_offsets(text)[1]])
  markers = tuple(tokenizer.special_tokens.values())

  def render(messages, prompt=False):
    return render_chat(tokenizer, template, messages, prompt, **variables)

  spans = []
  for i, message in enumerate(messages):
    if message.get('role') != 'assistant':
      continue
    previous_end = spans[-1][1] if spans else 0
    before = render(messages[:i], True)
    through = render(messages[: i + 1])
    if through.startswith(before) and text.startswith(through):
      start, end = len(before), len(through.rstrip())
    else:
      turn = _Turn(render, messages, i, before, through)
      start, end = _turn_by_probes(turn, text, previous_end, token_ends, markers)
    if end <= start:
      raise ConversationError(
          UNMASKABLE, f'message {i} (assistant): the template renders no text for it'
      )
    if start < previous_end:
      raise ConversationError(
          UNMASKABLE, f'message {i} (assistant): its turn overlaps the one before it'
      )
    spans.append((start, end))
  return text, spans


def _check_texts_rendered(messages, text, tools=None, prompt=False):
  """Refuses a conversation whose rendering lacks what one of its messages says: its text,
  the functions its tool calls name and the strings of their arguments, or the last
  assistant message's reasoning; or the names of the tools given (Mistral v0.3's template
  writes the system message only when a user message is last; Llama 3.1's drops the text of
  a message with tool calls; a template without tools drops their schemas). It would be
  trained on without it. Text counts as written where it appears anywhere in the rendering,
  also in JSON (Llama 3.1 writes tool results so). Reasoning of earlier turns a template may
  leave out by design (Qwen3 keeps only the last turns'), and in a `prompt` (a history to
  answer) the last assistant's too.

  Raises:
    ConversationError (template_error): the first such message.
  """
  assistants = [i for i, m in enumerate(messages) if m.get('role') == 'assistant']
  last_assistant = -1 if prompt or not assistants else assistants[-1]
  if prompt:
    consequence = 'the model would answer without it'
  else:
    consequence = 'it would be trained on without it'

  def written(part):
    part = part.strip()
    return part in text or json.dumps(part, ensure_ascii=False)[1:-1] in text

  def refuse(where, what):
    raise ConversationError(
        TEMPLATE_ERROR,
        f'{where}: the chat template leaves {what} out of the rendering, so {consequence};'
        ' give a template that writes it',
    )

  for i, message in enumerate(messages):
    content = message.get('content')
    said = {'its text': [content] if isinstance(content, str) else []}
    if isinstance(content, list):
      said['its text'] = [
          p['text'] for p in content if isinstance(p, dict) and isinstance(p.get('text'), str)
      ]
    functions = [c.get('function') for c in message.get('tool_calls') or [] if isinstance(c, dict)]
    functions = [f for f in functions if isinstance(f, dict)]
    said['its tool call'] = [f.get('name') for f in functions]
    said["its tool call's arguments"] = [s for f in functions for s in _strings(f.get('arguments'))]
    if i == last_assistant:
      said['its reasoning'] = [
          message[k] for k in REASONING_FIELDS if isinstance(message.get(k), str)
      ]
    for what, parts in said.items():
      if not all(written(part) for part in parts if isinstance(part, str)):
        refuse(f'message {i} ({message.get("role")})', what)
  for j, tool in enumerate(tools or []):
    function = tool.get('function', tool) if isinstance(tool, dict) else None
    name = function.get('name') if isinstance(function, dict) else None
    if isinstance(name, str) and not written(name):
      refuse(f'tool {j} ({name})', 'it')


def _strings(value):
  """The strings in a JSON value (a tool call's arguments: an object, or its JSON text);
  iterative, for values nested as deep as JSON allows."""
  strings, stack = [], [value]
  while stack:
    value = stack.pop()
    if isinstance(value, str):
      strings.append(value)
    elif isinstance(value, dict):
      stack.extend(value.values())
    elif isinstance(value, list):
      stack.extend(value)
  return strings


# Put inside a message's text to find where a template writes it: a private-use character,
# which no template tests for or changes.
_PROBE = '\ue000'


class _Turn(NamedTuple):
  """An assistant turn whose renderings are not prefixes of the whole: `render(messages,
  prompt)` renders, `before` is messages[:i] with a generation prompt, `through`
  messages[:i+1]."""

  render: Callable[..., str]
  messages: Sequence[dict]
  i: int
  before: str
  through: str


def _turn_by_probes(turn, text, previous_end, token_ends, markers):
  """The turn located in `text` by probes (see assistant_spans); `token_ends()` the end
  offsets of `text`'s tokens, `markers` are the tokenizer's named special tokens (EOS, ...):
  all a last turn may close with beyond what the whole rendering has.

  Raises:
    ConversationError (unmaskable): the template does not write the message's content
      (or, for a turn of tool calls alone, its first call's name) once and as it is, or
      writes no generation prompt or closing for it that the whole rendering has.
  """

  render, messages, i = turn.render, turn.messages, turn.i

  def unlocated(what):
    return ConversationError(
        UNMASKABLE,
        f'message {i} (assistant): the template does not render the conversation up to it'
        f' as a prefix of the whole, and {what}, so its turn cannot be located for the loss'
        ' mask',
    )

  content = messages[i].get('content')
  has_text = isinstance(content, str) and content.strip() or isinstance(content, list) and content
  if has_text:
    probe_start = _with_probe(messages, i, 'start')
    probe_end = _with_probe(messages, i, 'end')
    what = 'its content is not written once as it is'
  else:  # tool calls alone: what precedes the name is the template's, so a prompt is needed
    probe_start = probe_end = _with_probed_call(messages, i)
    what = "its first tool call's name is not written once as it is"
  if probe_start is None or probe_end is None:
    raise unlocated(what)
  inner_start = _insertion_point(text, render(probe_start))
  inner_end = _insertion_point(text, render(probe_end)) if has_text else inner_start
  if inner_start is None or inner_end is None or not previous_end <= inner_start <= inner_end:
    raise unlocated(what)
  # The start: after the generation prompt before the content; at the content where there
  # is none (Mistral's is empty; Apertus continues a turn after a tool's result), as the
  # least that is surely the turn's. A call's name is never a turn's start.
  start = _after_prompt(turn, text, previous_end, inner_start)
  if start is None and has_text:
    start = inner_start
  if start is None:
    raise unlocated('its generation prompt is not written before it')
  # The end: after the text the template writes after the probe when the turn is the last
  # one, as far as the whole rendering has it, cut at the end of one of its tokens (so not
  # inside '<|im_start|>' where the closing is '<|im_end|>\n<|endoftext|>').
  closing_start = _insertion_point(turn.through, render(probe_end[: i + 1]))
  if closing_start is None:
    raise unlocated('it is not written once as it is as the last turn')
  closing = turn.through[closing_start:]
  shared = _common_prefix_length(closing, text[inner_end : inner_end + len(closing)])
  ends = token_ends()
  last = bisect.bisect_right(ends, inner_end + shared) - 1
  end = ends[last] if last >= 0 and ends[last] > inner_end else inner_end
  # What the last turn writes beyond that must be markers (Phi-3.5's EOS), not its own
  # text written otherwise (Apriel's calls gain an id when a result follows).
  beyond = closing[end - inner_end :]
  for marker in markers:
    beyond = beyond.replace(marker, '')
  if beyond.strip():
    raise unlocated('as the last turn it ends otherwise than in the whole')
  return start, max(len(text[:end].rstrip()), inner_start)


def _after_prompt(turn, text, lo, hi):
  """Where the generation prompt for the turn ends in text[lo:hi], or None if it is empty
  or not there. The prompt is what one after messages[:i] adds to their
  rendering; a rendering that has only its start there (QwQ's and DeepSeek-R1's prompts
  open a <think> their turns lack) counts up to a line or marker end ('<|im_start|>assistant\n'
  of '<|im_start|>assistant\n<think>\n')."""
  history = turn.render(turn.messages[: turn.i])
  prompt = turn.before[_common_prefix_length(history, turn.before) :]
  if not prompt:
    return None
  for cut in range(len(prompt), 0, -1):
    if cut == len(prompt) or prompt[cut - 1] in '\n>':
      found = text.rfind(prompt[:cut], lo, hi)
      if found >= 0:
        return found + cut
  return None


def _with_probed_call(messages, i):
  """`messages` with _PROBE before the name of message i's first tool call, or None."""
  calls = messages[i].get('tool_calls')
  first = calls[0] if isinstance(calls, list) and calls else None
  function = first.get('function') if isinstance(first, dict) else None
  if not (isinstance(function, dict) and isinstance(function.get('name'), str)):
    return None
  probed = {**first, 'function': {**function, 'name': _PROBE + function['name']}}
  message = {**messages[i], 'tool_calls': [probed, *calls[1:]]}
  return [*messages[:i], message, *messages[i + 1 :]]


def _with_probe(messages, i, edge):
  """`messages` with _PROBE inside message i's text at its start or end, within any
  whitespace around it (which templates often trim); None if that part has no text."""
  message = dict(messages[i])
  content = message['content']
  if isinstance(content, list):  # text parts: the first's start, or the last's end
    j = 0 if edge == 'start' else len(content) - 1
    if not (isinstance(content[j], dict) and isinstance(content[j].get('text'), str)):
      return None
    part = {**content[j], 'text': _probed(content[j]['text'], edge)}
    message['content'] = [*content[:j], part, *content[j + 1 :]]
  else:
    message['content'] = _probed(content, edge)
  return [*messages[:i], message, *messages[i + 1 :]]


def _probed(text, edge):
  core = text.strip()
  lead = text[: len(text) - len(text.lstrip())]
  trail = text[len(text.rstrip()) :]
  return lead + (_PROBE + core if edge == 'start' else core + _PROBE) + trail


def _insertion_point(text, probed):
  """Where `probed` is `text` with _PROBE inserted once, or None."""
  at = _common_prefix_length(text, probed)
  if probed[at : at + len(_PROBE)] == _PROBE and probed[at + len(_PROBE) :] == text[at:]:
    return at
  return None


def _common_prefix_length(a, b):
  """The length of the longest common prefix of two strings, by slice comparisons (C speed;
  os.path.commonprefix compares character by character in Python)."""
  lo, hi = 0, min(len(a), len(b))
  while lo < hi:  # invariant: a[:lo] == b[:lo]; the answer is in [lo, hi]
    mid = (lo + hi + 1) // 2
    if a[lo:mid] == b[lo:mid]:
      lo = mid
    else:
      hi = mid - 1
  return lo


def chat_example(
    tokenizer: Tokenizer,
    template: str,
    messages: Sequence[dict],
    *,
    prompt_loss: bool = False,
    max_length: int = 0,
    **variables,
) -> tuple[np.ndarray, np.ndarray]:
  """A conversation as training arrays: ids (int32, `encode_chat`'s) and loss_mask (int32,
  1 on assistant turns, see the module docstring; all 1 with `prompt_loss`).

  `max_length` > 0 refuses longer conversations: they are never cut.

  Raises:
    ConversationError: template_error, unmaskable (a turn cannot be located) or too_long.
  """
  text, spans = assistant_spans(tokenizer, template, messages, **variables)
  ids, offsets = tokenizer.encode_offsets(text)
  if max_length and len(ids) > max_length:
    raise ConversationError(TOO_LONG, f'{len(ids)} tokens, more than max_length {max_length}')
  starts = np.asarray([a for a, _ in offsets], np.int64)
  # A token of no width (a prepended '▁') sits at its character.
  ends = np.maximum(np.asarray([b for _, b in offsets], np.int64), starts + 1)
  mask = np.zeros(len(ids), np.int32)
  for turn, (start, end) in enumerate(spans, 1):
    # Every token that overlaps the turn, as transformers' assistant mask counts it: one
    # across its edge is the turn's (Qwen3.5's '<think>\n' prompt and '\n</think>' turn
    # meet in one '\n\n').
    overlapping = (starts < end) & (ends > start)
    if not overlapping.any():
      raise ConversationError(UNMASKABLE, f'assistant turn {turn} has no token')
    mask[overlapping] = 1
  if prompt_loss:
    mask[:] = 1
  return np.asarray(ids, np.int32), mask


def end_of_turn_id(tokenizer: Tokenizer, template: str, **variables) -> int | None:
  """The id of the marker that ends an assistant turn (`<|eot_id|>`, `<|im_end|>`, ...):
  the last masked token of a probe conversation rendered with the template `variables`,
  if two probes with different answers share it (a turn that ends in its text has no
  marker: None). Generation stops there."""
  last = set()
  for answer in ('Hallo', 'Tschüss!'):
    messages = [{'role': 'user', 'content': 'Wie?'}, {'role': 'assistant', 'content': answer}]
    try:
      ids, mask = chat_example(tokenizer, template, messages, **variables)
    except ConversationError:
      return None
    last.add(int(ids[np.flatnonzero(mask)[-1]]))
  return last.pop() if len(last) == 1 else None


def stop_ids(
    eos_id: int | None,
    tokenizer: Tokenizer | None,
    template: str | None,
    base_model: dict | None = None,
    variables: dict | None = None,
) -> list[int]:
  """The ids that end a generation: EOS; for a run fine-tuned with `template` (and its
  `variables`), the marker that ends an assistant turn; and those of the imported model it
  descends from (`base_model`, see euro_lm.records.base_model_at). An export's
  generation_config.json lists them."""
  turn_end = None
  if tokenizer is not None and template:
    turn_end = end_of_turn_id(tokenizer, template, **(variables or {}))
  inherited = (base_model or {}).get('eos_token_id') or []
  return sorted({eos_id, turn_end, *inherited} - {None})


def add_chat_tokens(
    tokenizer: Tokenizer, output: str, tokens: Sequence[str] = DEFAULT_TEMPLATE_TOKENS
) -> list[str]:
  """Writes into the new directory `output` the tokenizer with `tokens` as single ids.

  Tokens it already encodes as one id are left as they are; the others get new ids after
  the last one, so the ids of all other text stay the same and a model's embeddings need
  only new rows (`vocab_size` of the written tokenizer). A tokenizer.json gets them as
  special added tokens (tokenizers' add_special_tokens); a SentencePiece model as
  user-defined pieces appended to the model (matched in any text, as its chat markers are).
  Returns the tokens added.
  """
  added = missing_tokens(tokenizer, tokens)
  os.makedirs(output)
  if tokenizer.backend == 'tokenizers':
    import tokenizers  # pylint: disable=import-outside-toplevel

    path = copy_files(tokenizer, output)
    extended = tokenizers.Tokenizer.from_file(path)
    extended.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in added]
    )
    extended.save(path)
  else:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer.files[0], 'rb') as f:
      proto.ParseFromString(f.read())
    for token in added:
      piece = proto.pieces.add()
      piece.piece = token
      piece.score = 0.0
      piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    with open(os.path.join(output, file_names(tokenizer)[tokenizer.files[0]]), 'wb') as f:
      f.write(proto.SerializeToString())
  return added
