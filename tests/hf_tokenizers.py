"""Small Hugging Face tokenizer folders shaped like the ones open models ship, built offline.

Each is made the way its family's files are: Llama 3's a byte-level BPE with its
pre-tokenizer regex and a template post-processor that adds <|begin_of_text|> (loaded by
transformers as a plain TokenizersBackend); Qwen2's, Gemma's and Mistral's written by
transformers' own Qwen2Tokenizer, GemmaTokenizer and LlamaTokenizer classes with
`save_pretrained` (tokenizer.json only, as transformers 5 saves them). Vocabularies are
trained on the embedded corpus, a few hundred pieces, with each family's chat markers
(<|start_header_id|>, <|im_start|>, <start_of_turn>, [INST], ...) as single tokens.
"""

import json
import os
import shutil

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from euro_lm.data import corpus

FAMILIES = ('llama3', 'qwen2', 'gemma', 'mistral')

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r'|\s*[\r\n]+|\s+(?!\S)|\s+'
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r'|\s*[\r\n]+|\s+(?!\S)|\s+'
)


def _texts():
  docs = corpus.load_embedded_corpus()
  return [d for tag in sorted(docs) for d in docs[tag][:150]]


def _byte_level_bpe(split, special_tokens, vocab_size):
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(Regex(split), behavior='isolated'),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=special_tokens,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(_texts(), trainer)
  return tokenizer


def _llama3(directory, vocab_size):
  tokenizer = _byte_level_bpe(_LLAMA3_SPLIT, [], vocab_size)
  specials = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>']
  tokenizer.add_special_tokens([*specials, '<|eot_id|>'])
  bos = ('<|begin_of_text|>', tokenizer.token_to_id('<|begin_of_text|>'))
  tokenizer.post_processor = processors.Sequence(
      [
          processors.ByteLevel(trim_offsets=False),
          processors.TemplateProcessing(
              single=f'{bos[0]} $A', pair=f'{bos[0]} $A {bos[0]} $B:1', special_tokens=[bos]
          ),
      ]
  )
  os.makedirs(directory)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  config = {
      'tokenizer_class': 'PreTrainedTokenizerFast',
      'bos_token': '<|begin_of_text|>',
      'eos_token': '<|end_of_text|>',
      'model_max_length': 131072,
  }
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)


def _qwen2(directory, vocab_size):
  from transformers import Qwen2Tokenizer  # pylint: disable=import-outside-toplevel

  tokenizer = _byte_level_bpe(
      _QWEN2_SPLIT, ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], vocab_size
  )
  model = json.loads(tokenizer.to_str())['model']
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
  Qwen2Tokenizer(
      vocab=model['vocab'], merges=merges, additional_special_tokens=['<|im_start|>', '<|im_end|>']
  ).save_pretrained(directory)


def _from_sentencepiece(directory, tokenizer_class, special, vocab_size, **trainer_args):
  """A SentencePiece BPE model converted by transformers' class and saved as tokenizer.json."""
  import transformers  # pylint: disable=import-outside-toplevel

  source = f'{directory}.sentencepiece'
  os.makedirs(source)
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(_texts()),
      model_prefix=os.path.join(source, 'tokenizer'),
      vocab_size=vocab_size,
      model_type='bpe',
      byte_fallback=True,
      split_digits=True,
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      minloglevel=2,
      **trainer_args,
  )
  config = {'tokenizer_class': tokenizer_class, **special, 'add_bos_token': True}
  with open(os.path.join(source, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  getattr(transformers, tokenizer_class).from_pretrained(source).save_pretrained(directory)
  shutil.rmtree(source)


def make_tokenizer_folder(family, directory, vocab_size=600):
  """Writes a `family` tokenizer folder (see FAMILIES) into the new `directory`."""
  directory = str(directory)
  if family == 'llama3':
    _llama3(directory, vocab_size)
  elif family == 'qwen2':
    _qwen2(directory, vocab_size)
  elif family == 'gemma':
    _from_sentencepiece(
        directory,
        'GemmaTokenizer',
        {'bos_token': '<bos>', 'eos_token': '<eos>', 'pad_token': '<pad>', 'unk_token': '<unk>'},
        vocab_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece='<pad>',
        eos_piece='<eos>',
        bos_piece='<bos>',
        unk_piece='<unk>',
        user_defined_symbols=['<start_of_turn>', '<end_of_turn>'],
        add_dummy_prefix=False,
    )
  elif family == 'mistral':
    _from_sentencepiece(
        directory,
        'LlamaTokenizer',
        {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'},
        vocab_size,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=['[INST]', '[/INST]'],
        add_dummy_prefix=True,
    )
  else:
    raise ValueError(family)
  return directory
