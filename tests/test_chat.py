"""Chat templates and conversations: ids equal transformers' apply_chat_template for the
templates of Llama 3, Mistral, Qwen2.5 and Gemma 3 on tokenizer folders of their families;
loss masks checked against each family's known assistant turn text through transformers'
own offsets, and against transformers' `{% generation %}` masks; the default template on a
SentencePiece tokenizer and a tokenizer.json; conversation files with bad records."""

import gzip
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
import zstandard

from euro_lm.data import chat, conversations
from euro_lm.data.corpus import load_embedded_corpus
from euro_lm.data.languages import resolve_language
from euro_lm.data.tokenizer import load_tokenizer, train_sentencepiece
from euro_lm.errors import ConfigError, DataError
from euro_lm.hf.tokenizer import write_tokenizer
from tests.chat_templates import GEMMA2, MISTRAL_SMALL_31, TEMPLATES, assistant_turn
from tests.hf_tokenizers import FAMILIES, make_tokenizer_folder

SYSTEM = {'role': 'system', 'content': 'Du bist ein hilfreicher Assistent.'}
CONVERSATIONS = [
    # One exchange with a system message.
    [
        SYSTEM,
        {'role': 'user', 'content': 'Wie heißt die Hauptstadt von Österreich?'},
        {'role': 'assistant', 'content': 'Wien.'},
    ],
    # Several turns, no system message; whitespace the templates trim or keep; scripts and
    # emoji that byte-level BPE splits inside a character.
    [
        {'role': 'user', 'content': ' Καλημέρα! 🤖'},
        {'role': 'assistant', 'content': 'Καλημέρα σας.  '},
        {'role': 'user', 'content': 'Żółć gęślą jaźń?\n'},
        {'role': 'assistant', 'content': 'Tak: 12345 €, ъ ю я 日本語'},
    ],
]


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """The families' tokenizer folders with their templates, stored as transformers 5 reads
  them: chat_template.jinja, or tokenizer_config.json's chat_template (Qwen's, Mistral's)."""
  root = tmp_path_factory.mktemp('chat')
  folders = {}
  for family in FAMILIES:
    folder = make_tokenizer_folder(family, root / family)
    if family in ('qwen2', 'mistral'):
      config_path = os.path.join(folder, 'tokenizer_config.json')
      with open(config_path) as f:
        config = json.load(f)
      config['chat_template'] = TEMPLATES[family]
      with open(config_path, 'w') as f:
        json.dump(config, f)
    else:
      with open(os.path.join(folder, chat.TEMPLATE_FILE), 'w') as f:
        f.write(TEMPLATES[family])
    folders[family] = folder
  return folders


def _theirs(folder):
  return transformers.AutoTokenizer.from_pretrained(folder)


def _conversations(family):
  # Mistral's template moves the system message into the last user turn.
  if family == 'mistral':
    return [c[1:] if c[0]['role'] == 'system' else c for c in CONVERSATIONS]
  return CONVERSATIONS


@pytest.mark.parametrize('family', FAMILIES)
def test_ids_equal_transformers_apply_chat_template(folders, family):
  theirs = _theirs(folders[family])
  tokenizer = load_tokenizer(folders[family])
  template = chat.chat_template_for(tokenizer)
  assert template == theirs.chat_template == TEMPLATES[family]
  assert tokenizer.special_tokens == theirs.special_tokens_map
  for messages in [*CONVERSATIONS, CONVERSATIONS[1][:3]]:
    if family == 'mistral' and messages[0]['role'] == 'system' and len(messages) > 3:
      continue
    for prompt in (False, True):
      expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt)
      assert chat.encode_chat(tokenizer, template, messages, prompt) == expected['input_ids']
      text = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
      assert chat.render_chat(tokenizer, template, messages, prompt) == text
  if family == 'llama3':  # a template variable, as apply_chat_template's kwargs pass it
    messages = CONVERSATIONS[0]
    expected = theirs.apply_chat_template(messages, date_string='01 Jan 2030')['input_ids']
    assert chat.encode_chat(tokenizer, template, messages, date_string='01 Jan 2030') == expected
    assert '01 Jan 2030' in theirs.decode(expected)


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('index', range(len(CONVERSATIONS)))
def test_the_mask_covers_exactly_the_assistant_turns(folders, family, index):
  """Independent expectation: the masked tokens' spans, by transformers' own offsets, are
  the assistant turns as each family's template writes them, one run per turn."""
  messages = _conversations(family)[index]
  theirs = _theirs(folders[family])
  tokenizer = load_tokenizer(folders[family])
  ids, mask = chat.chat_example(tokenizer, TEMPLATES[family], messages)
  assert ids.dtype == mask.dtype == np.int32
  text = theirs.apply_chat_template(messages, tokenize=False)
  encoding = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
  assert ids.tolist() == encoding['input_ids']
  offsets = encoding['offset_mapping']
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  runs = list(zip(edges[::2], edges[1::2]))
  masked = [text[offsets[a][0] : offsets[b - 1][1]] for a, b in runs]
  expected = [assistant_turn(family, m['content']) for m in messages if m['role'] == 'assistant']
  assert masked == expected
  # And the same through decoding: content and end marker, no header.
  for (a, b), turn in zip(runs, expected):
    assert theirs.decode(ids[a:b]).strip() == turn.strip()
  ids_all, mask_all = chat.chat_example(tokenizer, TEMPLATES[family], messages, prompt_loss=True)
  assert ids_all.tolist() == ids.tolist() and mask_all.tolist() == [1] * len(ids)


# ChatML whose assistant turns are `{% generation %}` blocks (content and <|im_end|>), so that
# transformers computes its own assistant mask.
_CHATML_WITH_GENERATION = (
    '{% for message in messages %}'
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# Gemma 3's template for these conversations, its model turns as `{% generation %}` blocks.
_GEMMA_WITH_GENERATION = (
    '{{ bos_token }}{% for m in messages %}'
    "{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' }}"
    "{% if m.role == 'assistant' %}"
    "{% generation %}{{ m.content | trim + '<end_of_turn>' }}{% endgeneration %}"
    "{% else %}{{ m.content | trim + '<end_of_turn>' }}{% endif %}{{ '\\n' }}"
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.mark.parametrize('messages', CONVERSATIONS)
def test_the_mask_equals_transformers_generation_mask(folders, messages):
  theirs = _theirs(folders['qwen2'])
  expected = theirs.apply_chat_template(
      messages, chat_template=_CHATML_WITH_GENERATION, return_assistant_tokens_mask=True
  )
  tokenizer = load_tokenizer(folders['qwen2'])
  ids, mask = chat.chat_example(tokenizer, _CHATML_WITH_GENERATION, messages)
  assert ids.tolist() == expected['input_ids']
  assert mask.tolist() == expected['assistant_masks']
  assert mask.sum() > 0


# Templates whose rendering up to a turn is not a prefix of the whole, with their assistant
# turns as `{% generation %}` blocks so that transformers computes the mask to compare with.
# Qwen3's way: reasoning (and an empty think block) only in turns after the last user turn.
_REASONING_AFTER_LAST_USER = (
    '{% set ns = namespace(last_user=-1) %}'
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
    '{% endif %}{% endfor %}'
    '{% for m in messages %}'
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}"
    '{% if loop.index0 > ns.last_user %}'
    "{{ '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m.content + '<|im_end|>\\n' }}{% endif %}"
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Phi-3.5's way: EOS after the last message unless a generation prompt follows.
_EOS_WHEN_NOT_PROMPTED = (
    '{% for m in messages %}'
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}"
    "{% if loop.last %}{{ '\\n' + eos_token }}{% endif %}{% endgeneration %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}{{ m.content + '<|im_end|>\\n' }}"
    '{% if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif %}{% endif %}'
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_REASONING_CONVERSATION = [
    SYSTEM,
    {'role': 'user', 'content': 'Wie viel ist 2 + 2?'},
    {'role': 'assistant', 'content': 'Vier.', 'reasoning_content': 'Zwei und zwei.'},
    {'role': 'user', 'content': 'Und 3 + 3?'},
    {'role': 'assistant', 'content': 'Sechs.', 'reasoning_content': 'Drei und drei.'},
]


@pytest.mark.parametrize(
    'template, messages',
    [
        (_REASONING_AFTER_LAST_USER, _REASONING_CONVERSATION),
        (_REASONING_AFTER_LAST_USER, CONVERSATIONS[1]),
        (_EOS_WHEN_NOT_PROMPTED, [SYSTEM, *CONVERSATIONS[1]]),
        (_EOS_WHEN_NOT_PROMPTED, CONVERSATIONS[1]),
    ],
)
def test_turns_of_templates_without_prefix_renderings_equal_transformers_mask(
    folders, template, messages
):
  theirs = _theirs(folders['qwen2'])
  tokenizer = load_tokenizer(folders['qwen2'])
  first = next(i for i, m in enumerate(messages) if m['role'] == 'assistant')
  through_first = chat.render_chat(tokenizer, template, messages[: first + 1])
  assert not chat.render_chat(tokenizer, template, messages).startswith(through_first)
  expected = theirs.apply_chat_template(
      messages, chat_template=template, return_assistant_tokens_mask=True
  )
  ids, mask = chat.chat_example(tokenizer, template, messages)
  assert ids.tolist() == expected['input_ids']
  assert mask.tolist() == expected['assistant_masks']
  assert mask.sum() > 0


def test_a_turn_a_template_changes_and_does_not_prefix_is_refused(folders):
  tokenizer = load_tokenizer(folders['qwen2'])
  # Earlier answers written twice: neither a prefix nor the content once.
  template = _REASONING_AFTER_LAST_USER.replace(
      "m.content + '<|im_end|>' }}{% endgeneration",
      "(m.content if loop.index0 > ns.last_user else m.content + ' ' + m.content)"
      " + '<|im_end|>' }}{% endgeneration",
  )
  with pytest.raises(chat.ConversationError, match='message 2 .*content is not written once') as e:
    chat.chat_example(tokenizer, template, _REASONING_CONVERSATION)
  assert e.value.kind == chat.UNMASKABLE


TOOLS = [
    {
        'type': 'function',
        'function': {
            'name': 'wetter',
            'description': 'Das Wetter einer Stadt',
            'parameters': {'type': 'object', 'properties': {'stadt': {'type': 'string'}}},
        },
    }
]
TOOL_CONVERSATION = [
    {'role': 'user', 'content': 'Wie ist das Wetter in Wien?'},
    {
        'role': 'assistant',
        'content': '',
        'tool_calls': [
            {'type': 'function', 'function': {'name': 'wetter', 'arguments': {'stadt': 'Wien'}}}
        ],
    },
    {'role': 'tool', 'name': 'wetter', 'content': '{"temperatur": 3, "himmel": "grau"}'},
    {'role': 'assistant', 'content': 'In Wien sind es 3 °C, der Himmel ist grau.'},
]


def test_tool_use_ids_and_mask(folders, tmp_path):
  """Tool calls and results as Qwen2.5's template writes them: ids equal transformers'
  with the same tools; the mask covers the call (as the model writes it) and the answer,
  not the tool's result; from a JSONL file (tools in the record) and a Parquet file (tools
  and messages as JSON text) the same."""
  theirs = _theirs(folders['qwen2'])
  tokenizer = load_tokenizer(folders['qwen2'])
  template = TEMPLATES['qwen2']
  expected = theirs.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS)['input_ids']
  assert chat.encode_chat(tokenizer, template, TOOL_CONVERSATION, tools=TOOLS) == expected
  ids, mask = chat.chat_example(tokenizer, template, TOOL_CONVERSATION, tools=TOOLS)
  assert ids.tolist() == expected
  text = theirs.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False)
  offsets = theirs(text, add_special_tokens=False, return_offsets_mapping=True)['offset_mapping']
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  masked = [text[offsets[a][0] : offsets[b - 1][1]] for a, b in zip(edges[::2], edges[1::2])]
  call = '{"name": "wetter", "arguments": ' + json.dumps({'stadt': 'Wien'}) + '}'
  assert masked == [
      f'<tool_call>\n{call}\n</tool_call><|im_end|>',
      TOOL_CONVERSATION[3]['content'] + '<|im_end|>',
  ]
  assert '{"temperatur": 3' in text and '{"temperatur": 3' not in ''.join(masked)
  jsonl = tmp_path / 'tools.jsonl'
  jsonl.write_text(json.dumps({'messages': TOOL_CONVERSATION, 'tools': TOOLS}) + '\n')
  parquet = str(tmp_path / 'tools.parquet')
  pq.write_table(
      pa.table({'messages': [json.dumps(TOOL_CONVERSATION)], 'tools': [json.dumps(TOOLS)]}),
      parquet,
  )
  for path in (str(jsonl), parquet):
    examples, bad = conversations.ConversationSource().examples(path, tokenizer, template)
    examples = list(examples)
    assert bad.total == 0 and len(examples) == 1
    assert examples[0].ids.tolist() == ids.tolist()
    assert examples[0].loss_mask.tolist() == mask.tolist()


# Qwen3's way with tool calls: an empty think block in the last turn only, so a turn of
# tool calls alone is not a prefix of the whole, and has no text to probe.
_THINK_IN_LAST_TURN_WITH_TOOLS = (
    '{% for m in messages %}'
    "{% if m.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}"
    "{% if loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{{ m.content or '' }}"
    '{% for c in m.tool_calls or [] %}'
    "{{ '<tool_call>\\n' + c.function.name + ' ' + c.function.arguments | tojson }}"
    "{{ '\\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m.content + '<|im_end|>\\n' }}{% endif %}{% endif %}"
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_turn_of_tool_calls_alone_equals_transformers_mask(folders):
  theirs = _theirs(folders['qwen2'])
  tokenizer = load_tokenizer(folders['qwen2'])
  template = _THINK_IN_LAST_TURN_WITH_TOOLS
  two_calls = {
      **TOOL_CONVERSATION[1],
      'tool_calls': TOOL_CONVERSATION[1]['tool_calls'] * 2,
  }
  for messages in (TOOL_CONVERSATION, [TOOL_CONVERSATION[0], two_calls, *TOOL_CONVERSATION[2:]]):
    through_call = chat.render_chat(tokenizer, template, messages[:2])
    assert not chat.render_chat(tokenizer, template, messages).startswith(through_call)
    expected = theirs.apply_chat_template(
        messages, chat_template=template, return_assistant_tokens_mask=True
    )
    ids, mask = chat.chat_example(tokenizer, template, messages)
    assert ids.tolist() == expected['input_ids']
    assert mask.tolist() == expected['assistant_masks']
  # Phi-3.5's way (EOS when not prompted) with a turn of tool calls alone.
  eos = template.replace(
      '{% endfor %}{% if add_generation_prompt %}',
      '{% endfor %}{% if not add_generation_prompt %}{{ eos_token }}{% endif %}'
      '{% if add_generation_prompt %}',
  ).replace("{% if loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}", '')
  assert eos != template
  expected = theirs.apply_chat_template(
      TOOL_CONVERSATION, chat_template=eos, return_assistant_tokens_mask=True
  )
  ids, mask = chat.chat_example(tokenizer, eos, TOOL_CONVERSATION)
  assert ids.tolist() == expected['input_ids'] and mask.sum() > 0
  # transformers' block ends before the '\n' and EOS the template writes after the last
  # turn, which euro_lm's last turn takes (the rendering through it ends so).
  assert ids[-1] == tokenizer.eos_id and tokenizer.decode(ids[-2:-1].tolist()) == '\n'
  assert mask.tolist() == expected['assistant_masks'][:-2] + [1, 1]
  # A call written otherwise when a result follows (Apriel's gains an id) is refused, not
  # cut where the two renderings part.
  with_id = template.replace(
      '{% for c in m.tool_calls or [] %}',
      '{% set last_turn = loop.last %}{% for c in m.tool_calls or [] %}',
  ).replace("{{ '\\n</tool_call>' }}", "{{ ('' if last_turn else ' #1') + '\\n</tool_call>' }}")
  assert ' #1' in chat.render_chat(tokenizer, with_id, TOOL_CONVERSATION)
  with pytest.raises(chat.ConversationError, match='ends otherwise than in the whole'):
    chat.chat_example(tokenizer, with_id, TOOL_CONVERSATION)
  # A template that writes the call's name twice there cannot place it.
  twice = template.replace("c.function.name + ' '", "c.function.name + ' ' + c.function.name")
  with pytest.raises(
      chat.ConversationError, match="first tool call's name is not written once"
  ) as e:
    chat.chat_example(tokenizer, twice, TOOL_CONVERSATION)
  assert e.value.kind == chat.UNMASKABLE


@pytest.mark.parametrize(
    'messages, tools, kind, reason',
    [
        (
            [{'role': 'user', 'content': 'a'}, {'role': 'tool', 'content': '1'}],
            None,
            'bad_order',
            'no tool call before it',
        ),
        (
            [TOOL_CONVERSATION[0], {'role': 'assistant', 'content': '', 'tool_calls': 'wetter'}],
            None,
            'bad_messages',
            'tool_calls is a str',
        ),
        (
            [TOOL_CONVERSATION[0], {'role': 'assistant', 'tool_calls': [{'function': {}}]}],
            None,
            'bad_messages',
            'tool call 0 is not an object with a function',
        ),
        (
            [
                {'role': 'user', 'content': 'a', 'tool_calls': []},
                {'role': 'assistant', 'content': 'b'},
            ],
            None,
            'bad_messages',
            "tool_calls in a 'user' message",
        ),
        (
            [
                {'role': 'user', 'content': 'a'},
                {'role': 'assistant', 'content': 'b', 'thinking': 1},
            ],
            None,
            'bad_messages',
            'thinking is a int',
        ),
        (TOOL_CONVERSATION, {'wetter': {}}, 'bad_messages', "'tools' is not a list of objects"),
        (TOOL_CONVERSATION, [{'function': {'name': '\ud800'}}], 'invalid_utf8', 'name is not'),
        (
            [
                TOOL_CONVERSATION[0],
                {**TOOL_CONVERSATION[1], 'tool_calls': [{'function': {'name': '\ud800'}}]},
            ],
            None,
            'invalid_utf8',
            'message 1: name is not valid Unicode',
        ),
        (
            [*TOOL_CONVERSATION[:2], {'role': 'user', 'content': 'Und?'}, *TOOL_CONVERSATION[2:]],
            None,
            'bad_order',
            'message 3: a tool result with no tool call before it',
        ),
    ],
)
def test_tool_use_and_reasoning_records_are_checked(tmp_path, messages, tools, kind, reason):
  path = tmp_path / 'chats.jsonl'
  path.write_text(json.dumps({'messages': messages, 'tools': tools}) + '\n')
  read, bad = conversations.ConversationSource().read(str(path))
  assert list(read) == []
  assert list(bad.kinds) == [kind] and reason in bad.kinds[kind].reason


def test_what_the_template_leaves_out_is_refused(folders):
  """Never trained on without it: a reasoning the template does not write (Qwen2.5's
  writes none), a tool call whose message text it drops (as Llama 3.1's does)."""
  tokenizer = load_tokenizer(folders['qwen2'])
  reasoning = [*CONVERSATIONS[1][:3], {**CONVERSATIONS[1][3], 'reasoning_content': 'Hm.'}]
  with pytest.raises(chat.ConversationError, match='message 3 .* leaves its reasoning out'):
    chat.chat_example(tokenizer, TEMPLATES['qwen2'], reasoning)
  # Earlier turns' reasoning a template may leave out by design (Qwen3 keeps the last's).
  earlier = [{**reasoning[1], 'reasoning_content': 'Hm.'}, *reasoning[2:3], CONVERSATIONS[1][3]]
  ids, _ = chat.chat_example(tokenizer, TEMPLATES['qwen2'], [reasoning[0], *earlier])
  assert 'Hm.' not in tokenizer.decode(ids.tolist())
  drops_text = TEMPLATES['qwen2'].replace("{{- '\\n' + message.content }}", '')
  with_text = [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], 'content': 'Ich sehe nach.'}]
  with pytest.raises(chat.ConversationError, match='message 1 .* leaves its text out') as e:
    chat.chat_example(tokenizer, drops_text, [*with_text, *TOOL_CONVERSATION[2:]], tools=TOOLS)
  assert e.value.kind == chat.TEMPLATE_ERROR
  # The default template writes no tools: their schemas would be lost.
  with pytest.raises(chat.ConversationError, match=r'tool 0 \(wetter\): .* leaves it out'):
    chat.chat_example(tokenizer, chat.DEFAULT_TEMPLATE, CONVERSATIONS[0], tools=TOOLS)


def test_a_prompt_encodes_as_transformers_with_the_generation_prompt(folders):
  """What a model answers from: ids equal transformers' with the generation prompt, for a
  system prompt and for a tool result with its tools; refused where the template drops
  tools or the history's text."""
  theirs = _theirs(folders['qwen2'])
  tokenizer = load_tokenizer(folders['qwen2'])
  template = TEMPLATES['qwen2']
  for messages, tools in ((CONVERSATIONS[0][:2], None), (TOOL_CONVERSATION[:3], TOOLS)):
    expected = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert chat.encode_prompt(tokenizer, template, messages, tools) == expected['input_ids']
  # The history's reasoning may be dropped by design, as in training.
  history = [{**CONVERSATIONS[1][1], 'reasoning_content': 'Hm.'}, CONVERSATIONS[1][2]]
  chat.encode_prompt(tokenizer, template, [CONVERSATIONS[1][0], *history])
  with pytest.raises(chat.ConversationError, match=r'tool 0 \(wetter\): .* leaves it out'):
    chat.encode_prompt(tokenizer, chat.DEFAULT_TEMPLATE, CONVERSATIONS[0][:2], TOOLS)
  drops_text = TEMPLATES['qwen2'].replace("{{- '\\n' + message.content }}", '')
  with_text = [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], 'content': 'Ich sehe nach.'}]
  with pytest.raises(chat.ConversationError, match='message 1 .* leaves its text out'):
    chat.encode_prompt(tokenizer, drops_text, [*with_text, TOOL_CONVERSATION[2]], TOOLS)


# SmolLM3's and Qwen3's way with a template variable: `enable_thinking` (default on) sets a
# system header flag in every rendering, and off it closes an empty think block in the
# generation prompt.
_THINKING_SWITCH = (
    '{% set thinking = enable_thinking if enable_thinking is defined else true %}'
    "{{ '<|im_start|>system\\n' + ('/think' if thinking else '/no_think') + '<|im_end|>\\n' }}"
    '{% for m in messages %}'
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ m.content + '<|im_end|>\\n' }}{% endif %}"
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if not thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)


def test_template_variables_render_as_transformers_keyword_arguments(folders):
  """data.chat_template_kwargs: ids and masks as `apply_chat_template(**kwargs)` gives them,
  in training and in the prompt a model answers from; bad settings are one error."""
  theirs = _theirs(folders['qwen2'])
  tokenizer = load_tokenizer(folders['qwen2'])
  messages = CONVERSATIONS[1]
  variables = chat.template_variables('{"enable_thinking": false}', 'data.chat_template_kwargs')
  assert variables == {'enable_thinking': False}
  expected = theirs.apply_chat_template(
      messages,
      chat_template=_THINKING_SWITCH,
      return_assistant_tokens_mask=True,
      return_dict=True,
      **variables,
  )
  ids, mask = chat.chat_example(tokenizer, _THINKING_SWITCH, messages, **variables)
  assert ids.tolist() == expected['input_ids'] and mask.tolist() == expected['assistant_masks']
  default, _ = chat.chat_example(tokenizer, _THINKING_SWITCH, messages)
  assert default.tolist() != ids.tolist()
  prompt = messages[:1]
  expected = theirs.apply_chat_template(
      prompt, chat_template=_THINKING_SWITCH, add_generation_prompt=True, **variables
  )
  ours = chat.encode_prompt(tokenizer, _THINKING_SWITCH, prompt, **variables)
  assert ours == expected['input_ids'] and '</think>' in tokenizer.decode(ours)
  assert chat.template_fingerprint(_THINKING_SWITCH, variables) != chat.template_fingerprint(
      _THINKING_SWITCH
  )
  assert chat.template_fingerprint('t', {}) == chat.template_fingerprint('t')
  for text, message in (
      ('{"enable_thinking": fals}', 'is not JSON'),
      ('[1]', 'is not a JSON object'),
      ('{"tools": []}', "sets 'tools', which is not a template variable of its own"),
      ('{"add_generation_prompt": true}', "sets 'add_generation_prompt'"),
  ):
    with pytest.raises(ConfigError, match=f'data.chat_template_kwargs.*{message}'):
      chat.template_variables(text, 'data.chat_template_kwargs')


@pytest.mark.parametrize(
    'messages, reason',
    [
        (
            TOOL_CONVERSATION,
            "message 3 has role 'assistant'; a prompt ends with a user message or a tool result",
        ),
        (
            [SYSTEM],
            "message 0 has role 'system'; a prompt ends with a user message or a tool result",
        ),
        (
            [{'role': 'assistant', 'content': 'Hallo'}],
            'message 0: an assistant message before any user message',
        ),
    ],
)
def test_prompts_end_with_a_user_message_or_a_tool_result(tmp_path, messages, reason):
  path = tmp_path / 'prompts.jsonl'
  lines = [{'messages': TOOL_CONVERSATION[:1]}, {'messages': TOOL_CONVERSATION[:3], 'tools': TOOLS}]
  path.write_text(''.join(json.dumps(r) + '\n' for r in [*lines, {'messages': messages}]))
  read, bad = conversations.ConversationSource(prompts=True).read(str(path))
  assert [c.messages for c in read] == [TOOL_CONVERSATION[:1], TOOL_CONVERSATION[:3]]
  assert [(k.count, k.first, k.reason) for k in bad.kinds.values()] == [(1, 3, reason)]
  assert list(bad.kinds) == [conversations.BAD_ORDER]


def test_conversations_a_template_cannot_take_are_refused_with_the_reason(folders):
  mistral = load_tokenizer(folders['mistral'])
  # Mistral v0.3 writes the system message into the last user turn, and leaves it out when
  # the conversation ends with the assistant: never trained on without it.
  for messages in ([SYSTEM, *CONVERSATIONS[1]], CONVERSATIONS[0]):
    assert SYSTEM['content'] not in chat.render_chat(mistral, TEMPLATES['mistral'], messages)
    with pytest.raises(chat.ConversationError, match='message 0 .system.: .* leaves its text') as e:
      chat.chat_example(mistral, TEMPLATES['mistral'], messages)
    assert e.value.kind == chat.TEMPLATE_ERROR
  # Gemma's and Mistral's templates refuse turns that do not alternate, in their words.
  gemma = load_tokenizer(folders['gemma'])
  two_users = [{'role': 'user', 'content': 'a'}, *CONVERSATIONS[1]]
  with pytest.raises(chat.ConversationError, match='roles must alternate') as e:
    chat.chat_example(gemma, TEMPLATES['gemma'], two_users)
  assert e.value.kind == chat.TEMPLATE_ERROR
  # Never cut: a conversation over max_length is refused.
  ids, _ = chat.chat_example(gemma, TEMPLATES['gemma'], CONVERSATIONS[1])
  assert chat.chat_example(gemma, TEMPLATES['gemma'], CONVERSATIONS[1], max_length=len(ids))
  with pytest.raises(chat.ConversationError, match=f'{len(ids)} tokens') as e:
    chat.chat_example(gemma, TEMPLATES['gemma'], CONVERSATIONS[1], max_length=len(ids) - 1)
  assert e.value.kind == chat.TOO_LONG
  # A token across a turn's edge: this Gemma vocabulary has a piece '\n%(' (Django's
  # catalogs), which joins the generation prompt's newline with a reply starting '%('.
  starts_with_a_piece = [
      {'role': 'user', 'content': 'x'},
      {'role': 'assistant', 'content': '%(n)s'},
  ]
  # It is the turn's, as in transformers' assistant mask.
  ids, mask = chat.chat_example(gemma, TEMPLATES['gemma'], starts_with_a_piece)
  expected = _theirs(folders['gemma']).apply_chat_template(
      starts_with_a_piece, chat_template=_GEMMA_WITH_GENERATION, return_assistant_tokens_mask=True
  )
  assert ids.tolist() == expected['input_ids'] and mask.tolist() == expected['assistant_masks']
  assert [gemma.decode([i]) for i in ids[mask == 1][:1].tolist()] == ['\n%(']
  with pytest.raises(ConfigError, match='line 1'):
    chat.compile_template('{% for m in messages %}')


def test_gemma_2_template_ids_masks_and_refusal_equal_transformers(folders):
  """Gemma 2's template on the Gemma tokenizer: ids and text as `apply_chat_template`, the
  mask on the model turns, and a system message refused in the template's own words, as
  transformers refuses it."""
  theirs = _theirs(folders['gemma'])
  tokenizer = load_tokenizer(folders['gemma'])
  messages = CONVERSATIONS[1]
  for prompt in (False, True):
    expected = theirs.apply_chat_template(
        messages, chat_template=GEMMA2, add_generation_prompt=prompt
    )
    assert chat.encode_chat(tokenizer, GEMMA2, messages, prompt) == expected['input_ids']
  ids, mask = chat.chat_example(tokenizer, GEMMA2, messages)
  masked = [theirs.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m])]
  assert masked == [
      ''.join(assistant_turn('gemma', m['content']) for m in messages if m['role'] == 'assistant')
  ]
  with pytest.raises(Exception, match='System role not supported'):
    theirs.apply_chat_template(CONVERSATIONS[0], chat_template=GEMMA2)
  with pytest.raises(chat.ConversationError, match='System role not supported') as e:
    chat.chat_example(tokenizer, GEMMA2, CONVERSATIONS[0])
  assert e.value.kind == chat.TEMPLATE_ERROR


def test_mistral_small_template_takes_content_as_text_parts(folders):
  """Mistral Small 3.1's template on the Mistral tokenizer, with content given as lists of
  text parts (its only way to take a system prompt) and as strings: ids equal
  `apply_chat_template`'s, the mask covers each assistant turn through its `</s>`, and a
  string system prompt is refused in the template's failure, as transformers refuses it."""
  theirs = _theirs(folders['mistral'])
  tokenizer = load_tokenizer(folders['mistral'])
  parts = lambda *texts: [{'type': 'text', 'text': t} for t in texts]  # noqa: E731
  system = {'role': 'system', 'content': parts(SYSTEM['content'])}
  split_question = {'role': 'user', 'content': parts('Wie heißt die Hauptstadt ', 'Tirols?')}
  answer = {'role': 'assistant', 'content': parts('Innsbruck.')}
  for messages in (
      [system, *CONVERSATIONS[1]],
      CONVERSATIONS[1],  # no system prompt: the template writes its dated default
      [system, split_question, answer],
  ):
    assert conversations.check_messages(messages) is None
    for prompt in (False, True):
      expected = theirs.apply_chat_template(
          messages, chat_template=MISTRAL_SMALL_31, add_generation_prompt=prompt
      )['input_ids']
      assert chat.encode_chat(tokenizer, MISTRAL_SMALL_31, messages, prompt) == expected
    ids, mask = chat.chat_example(tokenizer, MISTRAL_SMALL_31, messages)
    said = [m['content'] for m in messages if m['role'] == 'assistant']
    said = [s if isinstance(s, str) else s[0]['text'] for s in said]
    masked = theirs.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m])
    assert masked == ''.join(s + '</s>' for s in said)
  with pytest.raises(Exception, match="has no attribute 'text'"):
    theirs.apply_chat_template(CONVERSATIONS[0], chat_template=MISTRAL_SMALL_31)
  with pytest.raises(chat.ConversationError, match="has no attribute 'text'") as e:
    chat.chat_example(tokenizer, MISTRAL_SMALL_31, CONVERSATIONS[0])
  assert e.value.kind == chat.TEMPLATE_ERROR


def test_content_parts_a_template_would_write_as_python_text_are_refused(folders):
  """Llama 3's template takes content as a string: transformers renders a list of parts as
  Python's text of it, which euro_lm refuses rather than trains on. Parts that are not
  text are refused by the conversation check."""
  messages = [
      {'role': 'user', 'content': [{'type': 'text', 'text': 'Hallo?'}]},
      {'role': 'assistant', 'content': 'Hallo.'},
  ]
  rendered = _theirs(folders['llama3']).apply_chat_template(
      messages, chat_template=TEMPLATES['llama3'], tokenize=False
  )
  assert "{'type': 'text', 'text': 'Hallo?'}" in rendered
  tokenizer = load_tokenizer(folders['llama3'])
  with pytest.raises(chat.ConversationError, match='message 0: .* as Python text') as e:
    chat.chat_example(tokenizer, TEMPLATES['llama3'], messages)
  assert e.value.kind == chat.TEMPLATE_ERROR
  image = [{'role': 'user', 'content': [{'type': 'image', 'url': 'x.png'}]}, messages[1]]
  assert conversations.check_messages(image) == (
      conversations.BAD_MESSAGES,
      "message 0: content part 0 has type 'image'; euro_lm trains on text parts",
  )
  assert conversations.check_messages([messages[0], {'role': 'assistant', 'content': []}]) == (
      conversations.BAD_MESSAGES,
      'message 1: content is an empty list',
  )


# Template features beyond the four families' templates: transformers' `dict` (with
# fromkeys), reasoning under any of its names (Qwen3 reads reasoning_content), tools and
# documents passed as variables.
FEATURES = (
    "{% set d = dict.fromkeys(['a', 'b'], 1) %}{{ d | tojson }}{{ dict(x=2) | tojson }}"
    '{% for m in messages %}<|im_start|>{{ m.role }}\n'
    '{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}'
    '{% if m.thinking is defined %}[{{ m.thinking }}]{% endif %}'
    '{{ m.content }}<|im_end|>\n{% endfor %}'
    '{% if tools %}{{ tools | tojson }}{% endif %}'
    '{% for d in documents or [] %}{{ d.title }}: {{ d.text }}{% endfor %}'
)


def test_template_features_equal_transformers(folders):
  theirs = _theirs(folders['qwen2'])
  tokenizer = load_tokenizer(folders['qwen2'])
  messages = [
      {'role': 'user', 'content': 'Zwei plus zwei?'},
      {'role': 'assistant', 'content': 'Vier.', 'thinking': 'Zwei und zwei.'},
      {'role': 'user', 'content': 'Und drei?'},
      {'role': 'assistant', 'content': 'Fünf.', 'reasoning': 'Drei und zwei.'},
  ]
  tools = [{'type': 'function', 'function': {'name': 'rechnen', 'parameters': {}}}]
  documents = [{'title': 'Regel', 'text': 'Addition'}]
  for variables in ({}, {'tools': tools, 'documents': documents}):
    expected = theirs.apply_chat_template(
        messages, chat_template=FEATURES, tokenize=False, **variables
    )
    assert '<think>Zwei und zwei.</think>[Zwei und zwei.]' in expected
    assert chat.render_chat(tokenizer, FEATURES, messages, **variables) == expected


def test_a_template_that_is_not_jinja_is_one_error(folders, tmp_path):
  """Named before any conversation is read, not a template_error for each."""
  tokenizer = load_tokenizer(folders['qwen2'])
  path = tmp_path / 'broken.jinja'
  path.write_text('{% for m in messages %}{{ m.content }')
  with pytest.raises(ConfigError, match=f"data.chat_template='{path}': The chat template is not"):
    chat.template_named(str(path), tokenizer, 'data.chat_template')


def test_templates_are_found_where_transformers_looks(folders, tmp_path):
  folder = str(tmp_path / 'folder')
  shutil.copytree(folders['qwen2'], folder)
  config_path = os.path.join(folder, 'tokenizer_config.json')
  with open(config_path) as f:
    config = json.load(f)
  named = [{'name': 'default', 'template': 'A{{ bos_token }}'}, {'name': 'rag', 'template': 'B'}]
  config['chat_template'] = named
  with open(config_path, 'w') as f:
    json.dump(config, f)
  for name in ('', 'rag'):
    theirs = _theirs(folder).get_chat_template(name or None)
    assert chat.load_chat_template(folder, name) == theirs
  with pytest.raises(DataError, match="no chat template named 'other'"):
    chat.load_chat_template(folder, 'other')
  # chat_template.jinja wins over the config's.
  with open(os.path.join(folder, chat.TEMPLATE_FILE), 'w') as f:
    f.write('C')
  assert chat.load_chat_template(folder) == _theirs(folder).chat_template == 'C'


def test_the_default_template_on_a_sentencepiece_tokenizer(tmp_path):
  """A SentencePiece model trained without chat markers gets them appended as single ids
  (the other ids unchanged); euro_lm's ids and masks then equal what transformers computes
  on the exported tokenizer."""
  docs = load_embedded_corpus()
  texts = [d for tag in sorted(docs) for d in docs[tag][:60]]
  plain = train_sentencepiece(texts, str(tmp_path / 'plain' / 'tokenizer.model'), vocab_size=1000)
  with pytest.raises(ConfigError, match='add_chat_tokens'):
    chat.chat_template_for(plain)
  assert chat.add_chat_tokens(plain, str(tmp_path / 'chat')) == list(chat.DEFAULT_TEMPLATE_TOKENS)
  tokenizer = load_tokenizer(str(tmp_path / 'chat'))
  assert tokenizer.vocab_size == plain.vocab_size + 2
  assert [tokenizer.encode(t) for t in texts[:20]] == [plain.encode(t) for t in texts[:20]]
  template = chat.chat_template_for(tokenizer)
  assert template == chat.DEFAULT_TEMPLATE
  export = str(tmp_path / 'export')
  os.makedirs(export)
  write_tokenizer(tokenizer.path, export, log=lambda _: None)
  _check_default_template(tokenizer, _theirs(export), bos='<s>')


def test_the_default_template_on_a_tokenizer_json(folders, tmp_path):
  plain = load_tokenizer(folders['llama3'])
  output = str(tmp_path / 'llama3_chat')
  assert chat.add_chat_tokens(plain, output) == list(chat.DEFAULT_TEMPLATE_TOKENS)
  os.remove(os.path.join(output, chat.TEMPLATE_FILE))  # its Llama template; use the default
  tokenizer = load_tokenizer(output)
  assert tokenizer.vocab_size == plain.vocab_size + 2
  assert chat.chat_template_for(tokenizer) == chat.DEFAULT_TEMPLATE
  _check_default_template(tokenizer, _theirs(output), bos='<|begin_of_text|>')
  # Adding what is there already adds nothing.
  assert chat.add_chat_tokens(tokenizer, str(tmp_path / 'again')) == []


def _check_default_template(tokenizer, theirs, bos):
  for messages in CONVERSATIONS:
    ids, mask = chat.chat_example(tokenizer, chat.DEFAULT_TEMPLATE, messages)
    expected = theirs.apply_chat_template(messages, chat_template=chat.DEFAULT_TEMPLATE)
    assert ids.tolist() == expected['input_ids']
    assert ids[0] == tokenizer.bos_id == theirs.convert_tokens_to_ids(bos)
    marker = theirs.convert_tokens_to_ids('<|im_end|>')
    assert ids.tolist().count(marker) == len(messages)
    # Masked: each assistant content and its <|im_end|>, nothing else.
    ends = np.flatnonzero(ids == marker)
    turns = [m for m in messages if m['role'] == 'assistant']
    masked_ends = [e for e in ends if mask[e]]
    assert len(masked_ends) == len(turns)
    for end, turn in zip(masked_ends, turns):
      start = end
      while mask[start - 1]:
        start -= 1
      text = theirs.decode(ids[start:end], skip_special_tokens=False)
      assert text == turn['content']
    assert mask.sum() == sum(
        len(tokenizer.encode(m['content'])) + 1 for m in messages if m['role'] == 'assistant'
    )


def _write_jsonl(path, records, opener=open):
  with opener(path, 'wt', encoding='utf-8') as f:
    for record in records:
      f.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
      f.write('\n')


def _zstd_open(path, mode, encoding):
  return zstandard.open(path, mode, encoding=encoding)


GOOD = {'messages': CONVERSATIONS[0], 'lang': 'de'}
BAD = [  # (record, kind, what its reason says)
    ('{"messages": [', 'invalid_json', 'invalid JSON'),
    ({'text': 'no messages'}, 'missing_field', "no 'messages'"),
    ({'messages': []}, 'bad_messages', 'not a non-empty list'),
    ({'messages': [{'role': 'user', 'content': 3}]}, 'bad_messages', 'content is a int'),
    (
        {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'ipython', 'content': '{}'}]},
        'unsupported_role',
        "tool results take role 'tool'",
    ),
    ({'messages': [{'role': 'user', 'content': 'a'}]}, 'no_assistant', 'nothing to learn'),
    (
        {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': ' '}]},
        'empty_assistant',
        'no text or tool call',
    ),
    ({'messages': [SYSTEM, {'role': 'assistant', 'content': 'a'}]}, 'bad_order', 'before any user'),
    ({'messages': CONVERSATIONS[0], 'lang': 'xx-nonsense'}, 'unknown_language', ''),
]


@pytest.mark.parametrize('suffix', ['.jsonl', '.jsonl.gz', '.jsonl.zst'])
def test_conversation_files_count_bad_records_by_line(folders, tmp_path, suffix):
  path = str(tmp_path / f'chats{suffix}')
  opener = {'.jsonl': open, '.jsonl.gz': gzip.open, '.jsonl.zst': _zstd_open}[suffix]
  records = [GOOD, *[r for r, _, _ in BAD], GOOD]
  _write_jsonl(path, records, opener)
  source = conversations.ConversationSource(language_field='lang')
  read, bad = source.read(path)
  read = list(read)
  assert [c.position for c in read] == [1, len(records)]
  assert read[0].messages == CONVERSATIONS[0] and read[0].language == resolve_language('de')
  for line, (_, kind, reason) in reversed(list(enumerate(BAD, 2))):
    if bad.kinds[kind].first == line:  # the first of its kind
      assert reason in bad.kinds[kind].reason
  counts = {kind: sum(k == kind for _, k, _ in BAD) for _, kind, _ in BAD}
  assert {kind: v.count for kind, v in bad.kinds.items()} == counts
  firsts = {kind: next(i for i, (_, k, _) in enumerate(BAD, 2) if k == kind) for kind in counts}
  assert {kind: v.first for kind, v in bad.kinds.items()} == firsts
  assert bad.total == len(BAD)
  strict = conversations.ConversationSource(language_field='lang', strict=True)
  with pytest.raises(DataError, match=f'{path}:2: invalid JSON'):
    list(strict.read(path)[0])


def test_examples_count_what_the_template_refuses(folders, tmp_path):
  path = str(tmp_path / 'chats.jsonl')
  two_users = {'messages': [{'role': 'user', 'content': 'a'}, *CONVERSATIONS[1]]}
  long = {'messages': CONVERSATIONS[1]}
  _write_jsonl(path, [GOOD, two_users, long, GOOD])
  tokenizer = load_tokenizer(folders['gemma'])
  length = len(chat.encode_chat(tokenizer, TEMPLATES['gemma'], CONVERSATIONS[0]))
  source = conversations.ConversationSource(language='de')
  examples, bad = source.examples(path, tokenizer, TEMPLATES['gemma'], max_length=length)
  examples = list(examples)
  assert [e.location for e in examples] == [f'{path}:1', f'{path}:4']
  ids, mask = chat.chat_example(tokenizer, TEMPLATES['gemma'], CONVERSATIONS[0])
  assert (
      examples[0].ids.tolist() == ids.tolist() and examples[0].loss_mask.tolist() == mask.tolist()
  )
  assert examples[0].language == resolve_language('de')
  assert {k: (v.count, v.first) for k, v in bad.kinds.items()} == {
      chat.TEMPLATE_ERROR: (1, 2),
      chat.TOO_LONG: (1, 3),
  }
  assert 'roles must alternate' in bad.kinds[chat.TEMPLATE_ERROR].reason


def test_parquet_conversations(tmp_path):
  path = str(tmp_path / 'chats.parquet')
  structs = [CONVERSATIONS[0], [{'role': 'user', 'content': 'a'}], CONVERSATIONS[1]]
  pq.write_table(pa.table({'messages': structs}), path)
  read, bad = conversations.ConversationSource().read(path)
  assert [(c.messages, c.position, c.language) for c in read] == [
      (CONVERSATIONS[0], 0, ''),
      (CONVERSATIONS[1], 2, ''),
  ]
  assert bad.kinds['no_assistant'].first == 1 and f'{path} row 1' in bad.location(1)
  # A column of JSON text works the same.
  texts = [json.dumps(m) for m in structs[:2]] + ['[']
  pq.write_table(pa.table({'messages': texts, 'language': ['fr', 'fr', 'fr']}), path)
  read, bad = conversations.ConversationSource(language_field='language').read(path)
  assert [(c.position, c.language) for c in read] == [(0, resolve_language('fr'))]
  assert (bad.kinds['no_assistant'].first, bad.kinds['invalid_json'].first) == (1, 2)
  with pytest.raises(DataError, match="no column 'conversation'"):
    list(conversations.ConversationSource(messages_field='conversation').read(path)[0])


def test_the_template_bench_table(folders, tmp_path):
  """`python -m euro_lm.bench.chat_templates`' table: Qwen2.5's template renders all four
  conversations as transformers does and masks all but the one with reasoning, which it
  does not write; Gemma 2's refuses the system message and the tool result's turn in its
  own words, in euro_lm as in transformers, and writes no reasoning either."""
  from euro_lm.bench import chat_templates  # pylint: disable=import-outside-toplevel

  (tmp_path / 'qwen25.jinja').write_text(TEMPLATES['qwen2'])
  (tmp_path / 'gemma2.jinja').write_text(GEMMA2)
  lines, renders, masks = chat_templates.table(str(tmp_path), folders['qwen2'])
  assert lines[2:] == [
      '| gemma2 | =. | ee | ee | =e | .eee |',
      '| qwen25 | =. | =. | =. | =e | ...e |',
  ]
  assert renders == {'=': 6, 'e': 2} and masks == {'.': 4, 'e': 4}
