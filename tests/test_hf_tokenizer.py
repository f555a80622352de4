"""Hugging Face tokenizer.json tokenizers, proven against transformers' AutoTokenizer on
folders shaped like Llama 3's, Qwen2's, Gemma's and Mistral's; and carried through import,
training, checkpoints, prepared data and export unchanged."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import transformers

from configs import tiny
from euro_lm import hf
from euro_lm.checkpoint import CheckpointError
from euro_lm.data import chat, dataset, pipeline
from euro_lm.data.prepare.shards import prepare
from euro_lm.data.prepare.sources import TextSource
from euro_lm.data.tokenizer import copy_tokenizer, load_tokenizer
from euro_lm.errors import ConfigError, DataError
from euro_lm.hf.check import compare_with_transformers
from euro_lm.train.loop import train
from tests.hf_tokenizers import FAMILIES, make_tokenizer_folder
from tests.test_hf import HF_SHAPES, random_hf_model

# Every script of the embedded languages and then some, whitespace runs, digits, and the
# special tokens' text (which transformers matches as single ids wherever it occurs).
TEXTS = [
    'Grüße aus München! Die Straße ist schön.',
    ' a leading space, and  two  spaces',
    'Καλημέρα κόσμε· ά, έ, ή',
    'Здравейте! Българският език — ъ, ю, я.',
    'Żółć gęślą jaźń; Łódź 2024: 12345 €',
    '日本語 🤖 emoji\ttab\nnewline\n\n',
    'special <|im_end|> <|eot_id|> <bos> </s> <|begin_of_text|> inside',
    '',
]


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('tokenizers')
  return {family: make_tokenizer_folder(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize('family', FAMILIES)
def test_ids_equal_transformers(folders, family):
  theirs = transformers.AutoTokenizer.from_pretrained(folders[family])
  ours = load_tokenizer(folders[family])
  assert ours.backend == 'tokenizers'
  for text in TEXTS:
    bare = theirs(text, add_special_tokens=False)['input_ids']
    assert ours.encode(text) == bare, text
    bos = [ours.bos_id] if ours.adds_bos else []
    assert bos + ours.encode(text) == theirs(text)['input_ids'], text
    assert ours.decode(bare) == theirs.decode(bare, skip_special_tokens=True), text
  assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
  assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
  assert ours.pad_id == (-1 if theirs.pad_token_id is None else theirs.pad_token_id)
  assert ours.vocab_size == len(theirs)
  # Qwen has no BOS and prepends nothing; the others prepend theirs.
  assert ours.adds_bos == (family != 'qwen2')


@pytest.mark.parametrize('complete_config', [True, False])
def test_special_tokens_map_counts_only_in_a_legacy_folder(folders, tmp_path, complete_config):
  """A special_tokens_map.json whose EOS differs from tokenizer_config.json's: transformers 5
  reads it only when the config lacks added_tokens_decoder (as a legacy folder does)."""
  folder = str(tmp_path / 'qwen2')
  shutil.copytree(folders['qwen2'], folder)
  with open(os.path.join(folder, 'tokenizer.json'), encoding='utf-8') as f:
    added = json.load(f)['added_tokens']
  with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
    config = json.load(f)
  config['eos_token'] = '<|im_end|>'
  if complete_config:
    config['added_tokens_decoder'] = {
        str(t['id']): {k: v for k, v in t.items() if k != 'id'} for t in added
    }
  else:
    config.pop('added_tokens_decoder', None)
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f)
  with open(os.path.join(folder, 'special_tokens_map.json'), 'w', encoding='utf-8') as f:
    json.dump({'eos_token': '<|endoftext|>'}, f)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  ours = load_tokenizer(folder)
  assert ours.special_tokens['eos_token'] == theirs.eos_token
  assert ours.eos_id == theirs.eos_token_id
  assert theirs.eos_token == ('<|im_end|>' if complete_config else '<|endoftext|>')


def rewrite_json(path, **fields):
  with open(path, encoding='utf-8') as f:
    content = json.load(f)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(content | fields, f, ensure_ascii=False)


def older_conversion(folders, folder):
  """The Mistral-shaped folder with its tokenizer.json as an older conversion wrote it (a
  normalizer that prepends '▁', no pre-tokenizer: Llama 2's, Mistral v0.1's)."""
  shutil.copytree(folders['mistral'], folder)
  normalizer = {
      'type': 'Sequence',
      'normalizers': [
          {'type': 'Prepend', 'prepend': '\u2581'},
          {'type': 'Replace', 'pattern': {'String': ' '}, 'content': '\u2581'},
      ],
  }
  rewrite_json(os.path.join(folder, 'tokenizer.json'), pre_tokenizer=None, normalizer=normalizer)
  return folder


def assert_reads_as_transformers(folder):
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  ours = load_tokenizer(folder)
  for text in [*TEXTS, 'hello world how are you', '</s>[INST] Hallo</s> Welt<s>x']:
    ids = theirs(text, add_special_tokens=False)['input_ids']
    assert ours.encode(text) == ids, (folder, text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), (folder, text)
  return ours


@pytest.mark.parametrize('legacy', [None, False, True])
def test_an_older_llama_tokenizer_file_is_read_as_transformers_5_builds_it(
    folders, tmp_path, legacy
):
  """A LlamaTokenizer folder whose tokenizer.json is an older conversion (a normalizer that
  prepends '▁', as Llama 2's and Mistral v0.1's): transformers 5 rebuilds its pipeline,
  so '▁' is prepended after special tokens only with legacy: true. Ids of text, of text
  around special tokens and of a chat template equal AutoTokenizer's, as does decoding."""
  folder = older_conversion(folders, str(tmp_path / 'older'))
  with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
    config = json.load(f)
  assert config['tokenizer_class'] == 'LlamaTokenizer'
  config.pop('legacy', None)
  if legacy is not None:
    config['legacy'] = legacy
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  ours = load_tokenizer(folder)
  for text in [*TEXTS, ' leading space', '</s>[INST] Hallo</s> Welt<s>x']:
    assert ours.encode(text) == theirs(text, add_special_tokens=False)['input_ids'], text
    ids = theirs(text, add_special_tokens=False)['input_ids']
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
  template = '{{ bos_token }}{% for m in messages %}[INST] {{ m.content }}</s>{% endfor %}'
  messages = [{'role': 'user', 'content': 'Grüß Gott'}, {'role': 'user', 'content': 'Servus'}]
  expected = theirs.apply_chat_template(messages, chat_template=template)['input_ids']
  assert chat.encode_chat(ours, template, messages) == expected
  # The same file under the other legacy setting gives other ids: so does the fingerprint.
  flipped = str(tmp_path / 'flipped')
  shutil.copytree(folder, flipped)
  with open(os.path.join(flipped, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config | {'legacy': not legacy}, f)
  other = load_tokenizer(flipped)
  assert other.encode('</s>Hallo') != ours.encode('</s>Hallo')
  assert other.fingerprint != ours.fingerprint


@pytest.mark.parametrize('model_type', [None, 'mistral3', 'llama'])
def test_a_byte_level_file_under_the_llama_class_keeps_its_pipeline(folders, tmp_path, model_type):
  """Mistral Small 3.x ships a byte-level tokenizer.json and names LlamaTokenizerFast:
  transformers 5 never gives a byte-level file LlamaTokenizer's pipeline, with or without
  the model's config.json beside it, so spaces stay spaces."""
  folder = str(tmp_path / 'byte_level')
  shutil.copytree(folders['llama3'], folder)
  rewrite_json(os.path.join(folder, 'tokenizer_config.json'), tokenizer_class='LlamaTokenizerFast')
  if model_type:
    model = {'model_type': model_type, 'architectures': ['X']}
    with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump(model, f)
  ours = assert_reads_as_transformers(folder)
  assert ours.decode(ours.encode('hello world how are you')) == 'hello world how are you'


def test_an_older_mistral_file_beside_its_model_config_keeps_its_pipeline(folders, tmp_path):
  """Beside a Mistral model's config.json, transformers 5 reads an older conversion under
  the LlamaTokenizer class with the file's own pipeline (alone, it rebuilds it): so does
  euro_lm, and a copy of the tokenizer (import, checkpoints, export), which leaves the
  model's config.json behind, names the class that keeps transformers reading it so."""
  folder = older_conversion(folders, str(tmp_path / 'mistral_v01'))
  alone = assert_reads_as_transformers(folder)
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({'model_type': 'mistral', 'architectures': ['MistralForCausalLM']}, f)
  beside = assert_reads_as_transformers(folder)
  assert beside.encode(' leading space') != alone.encode(' leading space')
  copy = copy_tokenizer(beside, str(tmp_path / 'copy'))
  copied = assert_reads_as_transformers(copy)
  with open(os.path.join(copy, 'tokenizer_config.json'), encoding='utf-8') as f:
    assert json.load(f)['tokenizer_class'] == 'PreTrainedTokenizerFast'
  assert copied.encode(' leading space') == beside.encode(' leading space')
  assert copied.fingerprint == beside.fingerprint != alone.fingerprint
  assert beside.class_for_copies and not alone.class_for_copies


@pytest.mark.parametrize('in_tokenizer_config', [None, 'PreTrainedTokenizerFast'])
def test_a_class_named_only_in_the_model_config_builds_the_tokenizer(
    folders, tmp_path, in_tokenizer_config
):
  """transformers 5 takes the model config.json's tokenizer_class where
  tokenizer_config.json names none: an older conversion then reads as LlamaTokenizer
  builds it, and a copy (which leaves config.json behind) names that class. A class in
  tokenizer_config.json comes first."""
  folder = older_conversion(folders, str(tmp_path / 'older'))
  config_path = os.path.join(folder, 'tokenizer_config.json')
  with open(config_path, encoding='utf-8') as f:
    config = json.load(f)
  config.pop('tokenizer_class')
  if in_tokenizer_config:
    config['tokenizer_class'] = in_tokenizer_config
  with open(config_path, 'w', encoding='utf-8') as f:
    json.dump(config, f)
  alone = assert_reads_as_transformers(folder)
  model = {'model_type': 'llama', 'architectures': ['X'], 'tokenizer_class': 'LlamaTokenizer'}
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(model, f)
  beside = assert_reads_as_transformers(folder)
  if in_tokenizer_config:
    assert beside.encode(' leading space') == alone.encode(' leading space')
    assert beside.class_for_copies is None
    return
  assert beside.encode(' leading space') != alone.encode(' leading space')
  copy = copy_tokenizer(beside, str(tmp_path / 'copy'))
  with open(os.path.join(copy, 'tokenizer_config.json'), encoding='utf-8') as f:
    assert json.load(f)['tokenizer_class'] == beside.class_for_copies
  assert assert_reads_as_transformers(copy).fingerprint == beside.fingerprint


@pytest.mark.parametrize(
    'model_type, tokenizer_class',
    [('qwen2', 'LlamaTokenizerFast'), ('qwen2', 'PreTrainedTokenizerFast'), ('qwen3', None)],
)
def test_a_qwen2_models_tokenizer_is_qwen2s_whatever_it_names(
    folders, tmp_path, model_type, tokenizer_class
):
  """DeepSeek-R1-Distill-Qwen ships a Qwen2 model with another byte-level tokenizer.json
  (digits merged, no NFC) under LlamaTokenizerFast: transformers 5 builds Qwen2Tokenizer's
  pipeline for a Qwen2 model (and a Qwen3 one naming no class) whatever the folder names,
  and so does euro_lm; a copy names Qwen2Tokenizer, which transformers reads the same
  alone."""
  folder = str(tmp_path / 'distill')
  shutil.copytree(folders['llama3'], folder)
  path = os.path.join(folder, 'tokenizer.json')
  with open(path, encoding='utf-8') as f:
    description = json.load(f)
  vocab = description['model']['vocab']
  top = max([*vocab.values(), *(t['id'] for t in description['added_tokens'])])
  vocab.update({'12': top + 1, '123': top + 2})
  description['model']['merges'] += [['1', '2'], ['12', '3']]
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(description, f, ensure_ascii=False)
  config_path = os.path.join(folder, 'tokenizer_config.json')
  with open(config_path, encoding='utf-8') as f:
    config = json.load(f)
  config.pop('tokenizer_class', None)
  with open(config_path, 'w', encoding='utf-8') as f:
    json.dump(config | ({'tokenizer_class': tokenizer_class} if tokenizer_class else {}), f)
  alone = load_tokenizer(folder)
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({'model_type': model_type, 'architectures': ['X']}, f)
  ours = assert_reads_as_transformers(folder)
  text = 'cafe\u0301 123123'  # NFC, and Qwen's single digits
  assert ours.encode(text) != alone.encode(text)
  copy = copy_tokenizer(ours, str(tmp_path / 'copy'))
  with open(os.path.join(copy, 'tokenizer_config.json'), encoding='utf-8') as f:
    assert json.load(f)['tokenizer_class'] == 'Qwen2Tokenizer'
  assert assert_reads_as_transformers(copy).encode(text) == ours.encode(text)


def test_a_models_own_named_tokens_reach_the_template(folders, tmp_path):
  """Gemma 3's config names boi_token and, under extra_special_tokens, image_token:
  transformers 5 counts them among the special tokens that templates see."""
  folder = str(tmp_path / 'gemma')
  shutil.copytree(folders['gemma'], folder)
  with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
    config = json.load(f)
  config['boi_token'] = '<start_of_image>'
  config['extra_special_tokens'] = {'image_token': '<image_soft_token>'}
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  ours = load_tokenizer(folder)
  assert ours.special_tokens == theirs.special_tokens_map
  assert ours.special_tokens['image_token'] == '<image_soft_token>'
  template = '{{ bos_token }}{{ boi_token }}{{ image_token }}{{ messages[0].content }}'
  messages = [{'role': 'user', 'content': 'Bild'}]
  expected = theirs.apply_chat_template(messages, chat_template=template, tokenize=False)
  assert chat.render_chat(ours, template, messages) == expected


@pytest.mark.parametrize('family', FAMILIES)
def test_token_bytes_count_the_decoded_bytes(folders, family):
  tokenizer = load_tokenizer(folders[family])
  token_bytes = tokenizer.token_bytes()
  assert token_bytes.shape == (tokenizer.vocab_size,) and not token_bytes.flags.writeable
  for text in TEXTS[:-2]:  # no special tokens' text (counted 0), not empty
    ids = tokenizer.encode(text)
    # Mistral's Metaspace puts a '▁' before a text that starts with no space, as
    # SentencePiece's dummy prefix does; decoding drops it.
    prefix = family == 'mistral' and not text.startswith(' ')
    assert token_bytes[ids].sum() == len(text.encode('utf-8')) + prefix, text
  specials = [tokenizer.bos_id, tokenizer.eos_id]
  assert token_bytes[[i for i in specials if i is not None]].tolist() == [0] * (
      2 - specials.count(None)
  )


def test_the_fingerprint_follows_the_ids_not_the_location(folders, tmp_path):
  source = load_tokenizer(folders['llama3'])
  copy = load_tokenizer(copy_tokenizer(source, str(tmp_path / 'copy')))
  assert sorted(os.listdir(tmp_path / 'copy')) == ['tokenizer.json', 'tokenizer_config.json']
  assert copy.fingerprint == source.fingerprint
  config_path = tmp_path / 'copy' / 'tokenizer_config.json'
  config = json.loads(config_path.read_text())
  config['bos_token'] = '<|start_header_id|>'  # other document markers, other training data
  config_path.write_text(json.dumps(config))
  assert load_tokenizer(str(tmp_path / 'copy')).fingerprint != source.fingerprint
  assert load_tokenizer(folders['qwen2']).fingerprint != source.fingerprint


def test_a_tokenizer_file_under_another_name_is_copied_under_its_own(folders, tmp_path):
  """`data.tokenizer_path=.../llama3.json`: its copies (checkpoints, workdirs, imports) are
  named tokenizer.json, the name a directory is read by."""
  (tmp_path / 'mine').mkdir()
  for name in os.listdir(folders['llama3']):
    renamed = 'llama3.json' if name == 'tokenizer.json' else name
    shutil.copyfile(os.path.join(folders['llama3'], name), tmp_path / 'mine' / renamed)
  source = load_tokenizer(str(tmp_path / 'mine' / 'llama3.json'))
  copy = load_tokenizer(copy_tokenizer(source, str(tmp_path / 'copy')))
  assert sorted(os.listdir(tmp_path / 'copy')) == ['tokenizer.json', 'tokenizer_config.json']
  assert copy.fingerprint == load_tokenizer(folders['llama3']).fingerprint


def test_bad_tokenizer_files_are_named(folders, tmp_path):
  broken = tmp_path / 'broken'
  shutil.copytree(folders['llama3'], broken)
  (broken / 'tokenizer_config.json').write_text('{"bos_token": ')
  with pytest.raises(DataError, match=re.escape(f'{broken}/tokenizer_config.json is not valid')):
    load_tokenizer(str(broken))
  (broken / 'tokenizer_config.json').write_text('{"bos_token": "<|nope|>"}')
  with pytest.raises(DataError, match=r"bos_token='<\|nope\|>' is not a token of"):
    load_tokenizer(str(broken))
  (broken / 'tokenizer_config.json').write_text('{"eos_token": 7}')
  with pytest.raises(DataError, match=r'eos_token=7 is not a token string'):
    load_tokenizer(str(broken))
  (broken / 'tokenizer.json').write_text('{"model": 1}')
  with pytest.raises(DataError, match=re.escape(f'{broken}/tokenizer.json is not a valid')):
    load_tokenizer(str(broken))
  with pytest.raises(ConfigError, match=r"encodes with 'tokenizers', not 'tf_text'"):
    load_tokenizer(str(folders['qwen2']), backend='tf_text')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(DataError, match=rf'No tokenizer.json or tokenizer.model in .*{empty}'):
    load_tokenizer(str(empty))


@pytest.mark.parametrize('family', ['llama3', 'qwen2'])
def test_eval_documents_are_marked_as_the_tokenizer_does(folders, family):
  tokenizer = load_tokenizer(folders[family])
  docs = ['Grüße aus München!', 'Καλημέρα κόσμε']
  (batch,) = pipeline.make_eval_batches(
      docs,
      tokenizer,
      seq_len=64,
      batch_size=1,
      max_batches=0,
      add_bos=tokenizer.adds_bos,
      add_eos=True,
  )
  bos = [tokenizer.bos_id] if tokenizer.adds_bos else []
  marked = [[*bos, *tokenizer.encode(d), tokenizer.eos_id] for d in docs]
  inputs = [t for ids in marked for t in ids[:-1]]  # each document shifted on its own
  targets = [t for ids in marked for t in ids[1:]]
  assert batch['inputs'][0, : len(inputs)].tolist() == inputs
  assert batch['targets'][0, : len(targets)].tolist() == targets


def test_a_tokenizer_without_bos_refuses_add_bos(folders, tmp_path):
  config = tiny.get_config()
  config.update_from_flattened_dict(
      {'data.tokenizer_path': folders['qwen2'], 'data.languages': 'deu_Latn,fra_Latn'}
  )
  with pytest.raises(ConfigError, match=r'data.add_bos=True, but the tokenizer .* has no BOS'):
    dataset.make_data(config, str(tmp_path))


def quiet(*args):
  del args


RUN = {
    'train.steps': 2,
    'train.global_batch_size': 8,
    'train.seq_len': 32,
    'train.log_every': 1,
    'train.eval_every': 0,
    'train.checkpoint_every': 2,
    'train.eval_batches': 1,
    'data.languages': 'deu_Latn,ell_Grek,fra_Latn',
}


@pytest.mark.parametrize(
    'family, model',
    [
        ('llama3', 'llama3_rope'),
        ('mistral', 'mistral'),
        ('qwen2', 'qwen2'),
        # Qwen3 reads Qwen2's tokenizer as qwen2-qwen2 does; its model is in test_hf.
        pytest.param('qwen2', 'qwen3', marks=pytest.mark.slow),
        ('gemma', 'mha_tied'),
    ],
)
def test_an_imported_tokenizer_trains_checkpoints_and_exports_unchanged(
    folders, tmp_path, family, model
):
  """Each architecture with a tokenizer of its family: import gives transformers' logits and
  copies the folder's tokenizer files; training uses them (never a new
  tokenizer), the checkpoint carries them, and the export holds the same bytes, which
  transformers reads with the same ids, and the exported model gives the trained
  checkpoint's logits. The model's vocabulary is padded past the tokenizer's, as released
  models often are."""
  source = load_tokenizer(folders[family])
  hf_dir = tmp_path / 'hf'
  vocab_size = source.vocab_size + 11
  random_hf_model({**HF_SHAPES[model], 'vocab_size': vocab_size}).save_pretrained(hf_dir)
  for file in source.files:
    shutil.copy(file, hf_dir)
  config = hf.import_hf(str(hf_dir), str(tmp_path / 'imported'), log=quiet)
  imported = tmp_path / 'imported' / 'tokenizer'
  assert config.data.tokenizer_path == str(imported)
  assert config.data.add_bos == source.adds_bos and config.data.add_eos
  assert config.model.vocab_size == vocab_size
  imported_check = compare_with_transformers(str(hf_dir), str(tmp_path / 'imported'), log=quiet)
  assert imported_check['max_abs_diff'] < 1e-4 and imported_check['argmax_agreement'] == 1

  config.update_from_flattened_dict(RUN)
  workdir = tmp_path / 'run'
  train(config, str(workdir))
  assert not (workdir / 'tokenizer.model').exists()  # none was trained
  saved = load_tokenizer(str(workdir / 'checkpoints' / '2' / 'tokenizer'))
  assert saved.fingerprint == source.fingerprint

  output = tmp_path / 'export'
  hf.export_hf(str(workdir), str(output), dtype='float32', log=quiet)
  for file in source.files:
    assert (output / os.path.basename(file)).read_bytes() == open(file, 'rb').read(), file
  theirs = transformers.AutoTokenizer.from_pretrained(output)
  for text in TEXTS:
    assert theirs(text)['input_ids'] == [source.bos_id] * source.adds_bos + source.encode(text)
  exported_check = compare_with_transformers(str(output), str(workdir), log=quiet)
  assert exported_check['max_abs_diff'] < 1e-4 and exported_check['argmax_agreement'] == 1
  exported = json.loads((output / 'config.json').read_text())
  assert (exported['bos_token_id'], exported['eos_token_id']) == (source.bos_id, source.eos_id)


def test_init_from_an_imported_model_refuses_another_tokenizer(folders, tmp_path):
  hf_dir = tmp_path / 'hf'
  vocab_size = load_tokenizer(folders['llama3']).vocab_size
  random_hf_model({**HF_SHAPES['gqa_untied'], 'vocab_size': vocab_size}).save_pretrained(hf_dir)
  for file in load_tokenizer(folders['llama3']).files:
    shutil.copy(file, hf_dir)
  config = hf.import_hf(str(hf_dir), str(tmp_path / 'imported'), log=lambda *a: None)
  config.update_from_flattened_dict({**RUN, 'data.tokenizer_path': folders['mistral']})
  with pytest.raises(CheckpointError, match=r'the tokenizer .*mistral is not the one'):
    train(config, str(tmp_path / 'run'))


def test_a_tokenizer_with_more_ids_than_embedding_rows_is_refused_at_import(folders, tmp_path):
  hf_dir = tmp_path / 'hf'
  random_hf_model(HF_SHAPES['gqa_untied']).save_pretrained(hf_dir)  # 101 rows
  shutil.copy(os.path.join(folders['qwen2'], 'tokenizer.json'), hf_dir)
  with pytest.raises(hf.HFError, match=r'tokenizer.json has ids up to \d+, but .* vocab_size=101'):
    hf.import_hf(str(hf_dir), str(tmp_path / 'imported'), log=lambda *a: None)
  assert not (tmp_path / 'imported' / 'checkpoints' / '0').exists()


def test_prepared_data_records_the_tokenizer_it_was_tokenized_with(folders, tmp_path):
  raw = tmp_path / 'raw.jsonl'
  docs = ['Grüße aus München!', 'Die Straße ist schön.', 'Guten Tag.']
  raw.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  manifest = prepare(
      [str(raw)],
      str(tmp_path / 'prepared'),
      folders['qwen2'],
      TextSource(format='jsonl', language='deu_Latn'),
      workers=1,
  )
  tokenizer = load_tokenizer(folders['qwen2'])
  assert manifest['tokenizer']['sha256'] == tokenizer.fingerprint
  assert manifest['tokenizer']['bos_id'] is None
  assert manifest['languages']['deu_Latn']['tokens'] == sum(len(tokenizer.encode(d)) for d in docs)
  config = tiny.get_config()
  config.update_from_flattened_dict(
      {
          'data.corpus': 'prepared',
          'data.prepared_dir': str(tmp_path / 'prepared'),
          'data.tokenizer_path': folders['llama3'],
          'data.languages': 'deu_Latn',
      }
  )
  with pytest.raises(ConfigError, match=r'llama3 is not the one .* was prepared with'):
    dataset.make_data(config, str(tmp_path / 'run'))
  config.data.tokenizer_path = ''
  config.data.add_bos = False
  data = dataset.make_data(config, str(tmp_path / 'run'))
  assert data.tokenizer.fingerprint == tokenizer.fingerprint
  assert np.asarray(data.tokenizer.token_bytes()).sum() > 0


def test_import_check_prints_how_far_the_logits_differ(folders, tmp_path):
  import subprocess
  import sys

  hf_dir = tmp_path / 'hf'
  vocab_size = load_tokenizer(folders['gemma']).vocab_size
  random_hf_model({**HF_SHAPES['mha_tied'], 'vocab_size': vocab_size}).save_pretrained(hf_dir)
  for file in load_tokenizer(folders['gemma']).files:
    shutil.copy(file, hf_dir)
  done = subprocess.run(
      [sys.executable, '-m', 'euro_lm.import_hf', f'--hf={hf_dir}', f'--workdir={tmp_path / "run"}']
      + ['--check'],
      capture_output=True,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd()),
      timeout=300,
  )
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert re.fullmatch(r'bul_Cyrl +\d+ +\d\.\d\de-\d\d +(\d+)/\1 *', lines[-2]), lines[-2]
  match = re.fullmatch(
      r'largest difference (\S+) on logits up to \S+; the same next token '
      r'at (\d+) of (\d+) positions',
      lines[-1],
  )
  assert match and float(match[1]) < 1e-4 and match[2] == match[3], lines[-1]
