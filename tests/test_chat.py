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


def test_conversations_a_template_cannot_take_are_refused_with_the_reason(folders):
  mistral = load_tokenizer(folders['mistral'])
  # Mistral v0.3 moves the system message into the last user turn: earlier turns are not
  # prefixes of the whole, so their masks cannot be located.
  with pytest.raises(chat.ConversationError, match='message 2 .*prefix') as e:
    chat.chat_example(mistral, TEMPLATES['mistral'], [SYSTEM, *CONVERSATIONS[1]])
  assert e.value.kind == chat.UNMASKABLE
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
  with pytest.raises(chat.ConversationError, match='straddles') as e:
    chat.chat_example(gemma, TEMPLATES['gemma'], starts_with_a_piece)
  assert e.value.kind == chat.UNMASKABLE and repr('\n%(') in str(e.value)
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
        {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'tool', 'content': '{}'}]},
        'unsupported_role',
        'tool use',
    ),
    ({'messages': [{'role': 'user', 'content': 'a'}]}, 'no_assistant', 'nothing to learn'),
    (
        {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': ' '}]},
        'empty_assistant',
        'no text',
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
