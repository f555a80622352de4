"""The data the trainer needs: tokenizer, training batches, validation sets."""

import bisect
import collections.abc
import dataclasses
import glob
import json
import os
import sys

import ml_collections
import numpy as np

from euro_lm.data import chat, conversations, corpus, mixture, pipeline, prepared
from euro_lm.data.streams import (
    REPLAY_PREFIX,
    PackedStreams,
    process_streams,
    stream_language,
    stream_name,
    stream_source,
)
from euro_lm.data.tokenizer import (
    MODEL_TYPES,
    SENTENCEPIECE_MODEL,
    Tokenizer,
    balanced_texts,
    load_tokenizer,
    run_tokenizer,
    train_sentencepiece,
)
from euro_lm.errors import ConfigError

# The chat template a fine-tuning run trains with, in its workdir.
CHAT_TEMPLATE_FILE = 'chat_template.jinja'
# The language of conversations without a language field.
UNDETERMINED = conversations.UNDETERMINED
# Bounds the text a tokenizer trains on, shared equally by the languages.
_TOKENIZER_TRAINING_CHARS = 20_000_000


@dataclasses.dataclass
class Data:
  """What `make_data` builds for one process."""

  tokenizer: Tokenizer
  # This process's rows of every global batch (see euro_lm.data.streams).
  train: PackedStreams
  # Language tag -> eval batches, the same count and shape on every process.
  valid: dict[str, list[dict[str, np.ndarray]]]
  languages: list[str]
  # Language tag -> its training documents and their tokens (None where not counted: the
  # documents of prepared data stay on disk; its manifest has the whole source's counts).
  sizes: dict[str, dict] = dataclasses.field(default_factory=dict)


def make_data(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Data:
  """Builds the tokenizer and this process's train and validation data.

  `data.corpus='embedded'`: Django's catalogs, tokenized here. With
  `data.tokenizer_path` empty, the tokenizer is `<workdir>/tokenizer.model`:
  trained from the training split on first use and reused afterwards.
  Training is deterministic, so processes that each train it get the same
  model. `data.corpus='prepared'`: the ArrayRecord shards that
  `python -m euro_lm.prepare_data` wrote to `data.prepared_dir`, read lazily.
  `data.chat_files` (fine-tuning) replaces both with conversations: files read here, or
  directories of `prepare_data --chat` read lazily, optionally from named sources.
  """
  global_batch_size = config.train.global_batch_size
  if global_batch_size % process_count:
    raise ConfigError(
        f'train.global_batch_size={global_batch_size} is not divisible by'
        f' the {process_count} processes.'
    )
  chat_files = bool(config.data.chat_files)
  if chat_files:
    tokenizer, train_tokens, valid, token_counts = _conversations(
        config, workdir, write=process_index == 0
    )
  elif config.data.corpus == 'embedded':
    tokenizer, train_tokens, valid, token_counts = _embedded(config, workdir)
  elif config.data.corpus == 'prepared':
    tokenizer, train_tokens, valid, token_counts = _prepared(config)
  else:
    raise ConfigError(f'data.corpus={config.data.corpus!r} is not one of embedded, prepared.')
  batch_size = global_batch_size // process_count
  seq_len = config.train.seq_len
  if chat_files:
    weights_at = _chat_weights(config, token_counts)
  else:
    weights_at = mixture_schedule(config, token_counts).weights_at
  if chat_files and config.data.replay_fraction:
    weights_at = _with_replay(
        config, workdir, tokenizer, weights_at, train_tokens, valid, token_counts
    )
  train_streams = PackedStreams(
      train_tokens,
      weights_at,
      mean_document_tokens={
          tag: token_counts[tag] / max(len(docs), 1) for tag, docs in train_tokens.items()
      },
      seq_len=seq_len,
      num_streams=global_batch_size,
      streams=process_streams(global_batch_size, process_index, process_count),
      seed=config.data.seed,
      # A conversation's markers are its template's.
      bos_id=tokenizer.bos_id if config.data.add_bos and not chat_files else None,
      eos_id=tokenizer.eos_id if config.data.add_eos and not chat_files else None,
      masked=chat_files,
  )
  valid_batches = {
      tag: pipeline.make_eval_batches(
          valid[tag],
          tokenizer,
          seq_len=seq_len,
          batch_size=batch_size,
          max_batches=config.train.eval_batches,
          process_index=process_index,
          process_count=process_count,
          # Text (not conversations) has the document markers.
          add_bos=config.data.add_bos and not isinstance(valid[tag][0], tuple),
          add_eos=config.data.add_eos and not isinstance(valid[tag][0], tuple),
      )
      for tag in sorted(valid)
  }
  counted = chat_files or config.data.corpus == 'embedded'  # tokenized here, in memory
  sizes = {
      tag: {
          'documents': len(docs),
          'tokens': int(token_counts[tag])
          if counted and not (tag.startswith(REPLAY_PREFIX) and config.data.corpus == 'prepared')
          else None,
      }
      for tag, docs in sorted(train_tokens.items())
  }
  return Data(tokenizer, train_streams, valid_batches, sorted(train_tokens), sizes)


def _embedded(config, workdir):
  """(tokenizer, train token ids, valid texts, train token counts) per language."""
  docs = corpus.select_languages(corpus.load_embedded_corpus(), config.data.languages)
  train, valid = corpus.split_train_valid(docs, config.data.valid_fraction)
  tokenizer = _load_or_train_tokenizer(config, workdir, train)
  train_tokens = {
      tag: [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(docs)]
      for tag, docs in train.items()
  }
  token_counts = {tag: sum(map(len, d)) for tag, d in train_tokens.items()}
  return tokenizer, train_tokens, valid, token_counts


def chat_template_of_run(workdir: str) -> str | None:
  """The chat template a fine-tuning run in `workdir` trained with (written by
  `make_data`), or None: what export puts in tokenizer_config.json."""
  path = os.path.join(workdir, CHAT_TEMPLATE_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return f.read()


class _Replayed:
  """Pretraining documents as a masked stream's (ids with BOS/EOS, None: all in the loss)."""

  def __init__(self, documents, bos, eos):
    self._documents, self._bos, self._eos = documents, bos, eos

  def __len__(self):
    return len(self._documents)

  def __getitem__(self, index):
    ids = np.asarray(self._documents[index], np.int32)
    return np.concatenate([self._bos, ids, self._eos]).astype(np.int32), None


def _with_replay(config, workdir, tokenizer, weights_at, train_tokens, valid, token_counts):
  """Adds `data.corpus`'s languages as `replay-<tag>` sources (in place) and returns the
  weights: the conversations' scaled to 1 - data.replay_fraction, the replayed languages'
  natural shares to the rest. Replay validation sets are scored as text."""
  d = config.data
  if d.corpus == 'embedded':
    replay_tokenizer, replay_tokens, replay_valid, replay_counts = _embedded(config, workdir)
  else:
    replay_tokenizer, replay_tokens, replay_valid, replay_counts = _prepared(config)
  if replay_tokenizer.fingerprint != tokenizer.fingerprint:
    raise ConfigError(
        f'data.replay_fraction: data.corpus={d.corpus!r} is tokenized with another tokenizer'
        f' ({replay_tokenizer.path}) than the conversations ({tokenizer.path})'
    )
  bos = [tokenizer.bos_id] if d.add_bos and tokenizer.bos_id is not None else []
  eos = [tokenizer.eos_id] if d.add_eos and tokenizer.eos_id is not None else []
  total = sum(replay_counts.values())
  replay_shares = {}
  for tag in replay_tokens:
    name = REPLAY_PREFIX + tag
    train_tokens[name] = _Replayed(replay_tokens[tag], bos, eos)
    valid[name] = replay_valid[tag]
    token_counts[name] = replay_counts[tag]
    replay_shares[name] = d.replay_fraction * replay_counts[tag] / total

  def with_replay(step):
    weights = weights_at(step)
    scale = (1 - d.replay_fraction) / sum(weights.values())
    return {**{tag: w * scale for tag, w in weights.items()}, **replay_shares}

  return with_replay


def _conversations(config, workdir, write):
  """Like `_embedded`, from `data.chat_files`: (ids, loss_mask) pairs per stream (the
  language, or `<source>/<language>` for named sources), every k-th conversation of each
  held out as `corpus.split_train_valid` does. Raw files are read into memory, prepared
  directories (`prepare_data --chat`) stay on disk; both give the same conversations in
  the same order. Token counts are the training share of each stream's tokens (its mean
  conversation length times its training conversations). The template used is saved in
  the workdir."""
  d = config.data
  sources = {
      name: [_chat_entry(entry) for entry in entries]
      for name, entries in mixture.parse_sources(d.chat_files, field='data.chat_files').items()
  }
  directories = [e for entries in sources.values() for e in entries if isinstance(e, dict)]
  path = d.tokenizer_path or run_tokenizer(workdir)
  if not path and directories:  # as data.corpus='prepared' does
    path = directories[0]['tokenizer']['path']
  if not path:
    raise ConfigError(
        'data.chat_files needs a tokenizer: set train.init_from (its tokenizer) or'
        ' data.tokenizer_path'
    )
  tokenizer = load_tokenizer(path)
  _check_tokenizer(tokenizer, config, path, markers=False)
  template = chat.template_named(d.chat_template, tokenizer, 'data.chat_template')
  variables = chat.template_variables(d.chat_template_kwargs, 'data.chat_template_kwargs')
  for manifest in directories:
    _check_prepared_conversations(manifest, tokenizer, template, variables, d.chat_template)
  source = conversations.ConversationSource(
      messages_field=d.chat_messages_field, language_field=d.chat_language_field
  )
  # Longer than a row (its seq_len inputs and the last target): a too_long bad record.
  max_length = config.train.seq_len + 1
  parts = {}  # stream -> [(conversations, their tokens)]
  for name, entries in sources.items():
    for entry in entries:
      if isinstance(entry, dict):
        for tag, info in entry['languages'].items():
          documents = prepared.document_source(entry['directory'], tag)
          if d.prompt_loss:  # the shards mask assistant turns
            documents = documents.map(lambda pair: (pair[0], np.ones_like(pair[1])))
          documents, tokens, left_out = _fitting(documents, info, max_length)
          if left_out and write:
            print(
                f'{entry["directory"]}: {left_out} {tag} conversation(s) longer than'
                f' train.seq_len + 1 = {max_length} tokens, left out (too_long)'
            )
          parts.setdefault(stream_name(name, tag), []).append((documents, tokens))
        continue
      examples, reports, warnings = conversations.read_examples(
          source,
          entry,
          tokenizer,
          template,
          prompt_loss=d.prompt_loss,
          max_length=max_length,
          variables=variables,
      )
      for report in reports if write else ():  # one process says it
        for kind, bad in sorted(report.kinds.items()):
          print(
              f'{report.location(bad.first)}: {bad.count} bad record(s) of kind {kind}, '
              f'left out; the first: {bad.reason}'
          )
      for warning in warnings if write else ():
        print(f'warning: {warning}', file=sys.stderr)
      by_language = {}
      for example in examples:
        by_language.setdefault(example.language or UNDETERMINED, []).append(
            (example.ids, example.loss_mask)
        )
      for tag, pairs in by_language.items():
        tokens = sum(len(ids) for ids, _ in pairs)
        parts.setdefault(stream_name(name, tag), []).append((pairs, tokens))
  parts = _select_chat_languages(parts, d.languages)
  if not parts:
    raise ConfigError(f'data.chat_files={d.chat_files!r}: no usable conversation')
  train, valid, token_counts = {}, {}, {}
  for stream in sorted(parts):
    documents = _Chained([documents for documents, _ in parts[stream]])
    tokens = sum(tokens for _, tokens in parts[stream])
    held_out = corpus.held_out_indices(len(documents), d.valid_fraction, stream)
    kept = sorted(set(range(len(documents))) - set(held_out))
    train[stream] = _Subset(documents, kept)
    valid[stream] = _Subset(documents, held_out)
    token_counts[stream] = tokens * len(kept) / len(documents)
  if write:
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, CHAT_TEMPLATE_FILE)
    with open(target + '.tmp', 'w', encoding='utf-8') as f:
      f.write(template)
    os.replace(target + '.tmp', target)
  return tokenizer, train, valid, token_counts


def _chat_entry(entry):
  """A data.chat_files entry: a prepared directory's manifest (with its `directory`), or
  the files a glob matches."""
  if os.path.isdir(entry):
    manifest = prepared.read_manifest(entry)
    if manifest.get('kind') != prepared.CONVERSATIONS:
      raise ConfigError(
          f'data.chat_files: {entry} holds text documents, not conversations: prepare the'
          ' conversation files with `python -m euro_lm.prepare_data --chat`'
      )
    return {**manifest, 'directory': entry}
  paths = sorted(glob.glob(entry))
  if not paths:
    raise ConfigError(f'data.chat_files: {entry!r} matches no file')
  return paths


def _check_prepared_conversations(manifest, tokenizer, template, variables, template_name):
  """A prepared directory's ids are the run's only with its tokenizer, template and
  template variables."""
  directory = manifest['directory']
  if manifest['tokenizer']['sha256'] != tokenizer.fingerprint:
    raise ConfigError(
        f'data.chat_files: {directory} was prepared with the tokenizer'
        f' {manifest["tokenizer"]["path"]} (sha256 {manifest["tokenizer"]["sha256"][:12]}),'
        f' this run has {tokenizer.path} (sha256 {tokenizer.fingerprint[:12]}): prepare it'
        " again with the run's tokenizer"
    )
  settings = manifest['settings']
  theirs_variables = settings.get('template_kwargs') or {}
  theirs = settings['template_sha256']
  ours = chat.template_fingerprint(template, theirs_variables)
  if theirs != ours:
    raise ConfigError(
        f'data.chat_files: {directory} was rendered with another chat template (sha256'
        f" {theirs[:12]}, in its {prepared.MANIFEST}) than this run's"
        f' (data.chat_template={template_name!r}: sha256 {ours[:12]}): prepare it again with'
        ' that template (--chat_template) or set data.chat_template to its template'
    )
  if theirs_variables != variables:
    theirs, ours = (json.dumps(v, sort_keys=True) for v in (theirs_variables, variables))
    raise ConfigError(
        f'data.chat_files: {directory} was rendered with the template variables {theirs} (in'
        f' its {prepared.MANIFEST}), this run has data.chat_template_kwargs={ours}: prepare'
        ' it again with --chat_template_kwargs, or set the same variables'
    )


def _fitting(documents, info, max_length):
  """(the conversations of at most `max_length` tokens, their tokens, how many are left
  out); the manifest's `longest` spares reading them when all fit."""
  if info['longest'] <= max_length:
    return documents, info['tokens'], 0
  lengths = np.asarray([len(documents[i][0]) for i in range(len(documents))], np.int64)
  kept = np.flatnonzero(lengths <= max_length)
  return _Subset(documents, kept.tolist()), int(lengths[kept].sum()), len(documents) - len(kept)


def _select_chat_languages(parts, spec):
  """The streams of the languages data.languages names ('' all): each must be in a source."""
  languages = {stream_language(stream): [] for stream in parts}
  wanted = corpus.select_languages(languages, spec)
  return {stream: p for stream, p in parts.items() if stream_language(stream) in wanted}


class _Subset(collections.abc.Sequence):
  """The documents of a sequence at the given indices, in their order."""

  def __init__(self, documents, indices):
    self._documents, self._indices = documents, list(indices)

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, index):
    return self._documents[self._indices[index]]


class _Chained(collections.abc.Sequence):
  """Sequences one after the other."""

  def __init__(self, parts):
    self._parts = [p for p in parts if len(p)]
    self._ends = np.cumsum([len(p) for p in self._parts]).tolist()

  def __len__(self):
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    part = bisect.bisect_right(self._ends, index)
    return self._parts[part][index - (self._ends[part - 1] if part else 0)]


def _chat_weights(config, token_counts):
  """Step -> weight per stream: within each source its languages by data.mixture (one
  language-less pool: `und` alone), sources by data.chat_source_weights (default: their
  tokens)."""
  by_source = {}
  for stream, n in token_counts.items():
    source, language = stream_source(stream), stream_language(stream)
    by_source.setdefault(source, {})[language] = n
  within = {
      source: _language_weights(config, counts, source) for source, counts in by_source.items()
  }
  if list(by_source) == ['']:
    return within['']
  if config.data.chat_source_weights:
    shares_at = mixture.source_schedule(
        config.data.chat_source_weights, by_source, field='data.chat_source_weights'
    ).weights_at
  else:
    totals = {source: sum(counts.values()) for source, counts in by_source.items()}
    shares_at = lambda step: totals  # noqa: E731

  def weights_at(step):
    shares = shares_at(step)
    total = sum(shares.values())
    return {
        stream_name(source, language): shares[source] / total * weight
        for source in sorted(by_source)
        for language, weight in within[source](step).items()
    }

  return weights_at


def _language_weights(config, counts, source):
  if set(counts) == {UNDETERMINED}:  # conversations without languages: one pool
    return lambda step: {UNDETERMINED: 1.0}
  where = f' (source {source!r})' if source else ''
  if UNDETERMINED in counts:
    raise ConfigError(
        f'data.chat_files{where}: conversations with a language and without one'
        f' ({UNDETERMINED}) in one source: give them their own source, or all a language'
    )
  try:
    return mixture_schedule(config, counts).weights_at
  except ConfigError as e:
    if not source:
      raise
    raise ConfigError(f'{e}{where}') from None


class _AllBut:
  """Documents of a sequence except every k-th (those are held out)."""

  def __init__(self, documents, k):
    self._documents, self._k = documents, k
    self._len = len(documents) - len(range(0, len(documents), k))

  def __len__(self):
    return self._len

  def __getitem__(self, index):
    if not 0 <= index < self._len:
      raise IndexError(index)
    return self._documents[index + index // (self._k - 1) + 1]


def _prepared(config):
  """Like `_embedded`, from `data.prepared_dir`; documents stay on disk."""
  d = config.data
  if not d.prepared_dir:
    raise ConfigError(
        "data.corpus='prepared' needs data.prepared_dir, the output of"
        ' `python -m euro_lm.prepare_data`.'
    )
  manifest = prepared.read_manifest(d.prepared_dir)
  if manifest.get('kind') == prepared.CONVERSATIONS:
    raise ConfigError(
        f'data.prepared_dir={d.prepared_dir!r} holds conversations (prepare_data --chat):'
        ' fine-tune on them with data.chat_files'
    )
  path = d.tokenizer_path or manifest['tokenizer']['path']
  tokenizer = load_tokenizer(path)
  if tokenizer.fingerprint != manifest['tokenizer']['sha256']:
    raise ConfigError(
        f'the tokenizer {path} is not the one {d.prepared_dir} was prepared'
        f' with ({manifest["tokenizer"]["path"]}): set data.tokenizer_path to that tokenizer.'
    )
  _check_tokenizer(tokenizer, config, path)
  languages = corpus.select_languages(manifest['languages'], d.languages)
  k = corpus.holdout_every(d.valid_fraction)
  train_tokens, valid, token_counts = {}, {}, {}
  for tag in sorted(languages):
    documents = prepared.document_source(d.prepared_dir, tag)
    if len(documents) < 2:
      raise ConfigError(
          f'{tag} has {len(documents)} documents in {d.prepared_dir}; holding'
          ' one out for validation needs at least 2 (see data.languages).'
      )
    train_tokens[tag] = _AllBut(documents, k)
    valid[tag] = documents[::k]
    token_counts[tag] = manifest['languages'][tag]['tokens'] * (1 - 1 / k)
  return tokenizer, train_tokens, valid, token_counts


def _check_tokenizer(tokenizer, config, path, markers=True):
  """The embedding needs a row per piece. More rows than pieces (a padded vocabulary, as
  many released models have) is valid: those ids never occur in the data, and generation
  never samples them. The document markers data.add_bos/add_eos ask for must exist
  (`markers`; conversations have their template's)."""
  vocab_size = config.model.vocab_size
  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(
        f'The tokenizer {path} has vocab size {tokenizer.vocab_size}, but'
        f' model.vocab_size is {vocab_size}.'
    )
  for field, token_id, name in (
      ('add_bos', tokenizer.bos_id, 'BOS'),
      ('add_eos', tokenizer.eos_id, 'EOS'),
  )[: 2 if markers else 0]:
    if config.data[field] and token_id is None:
      raise ConfigError(
          f'data.{field}=True, but the tokenizer {path} has no {name} token; set'
          f' data.{field}=False (a model imported with it has it set as its tokenizer does).'
      )


def mixture_schedule(
    config: ml_collections.ConfigDict, token_counts: dict[str, int]
) -> mixture.MixtureSchedule:
  """The per-language sampling weights of `data.mixture`, by step."""
  d = config.data
  if d.mixture == 'explicit':
    text = d.mixture_weights
    if not text:
      raise ConfigError(
          "data.mixture='explicit' needs data.mixture_weights, e.g."
          " 'deu_Latn=2,fra_Latn=1' or '0:deu_Latn=2,fra_Latn=1;9000:...'"
      )
    return mixture.weight_schedule(text, token_counts, field='data.mixture_weights')
  if d.mixture == 'natural':
    weights = mixture.temperature_weights(token_counts, 1.0, field='data.mixture')
  elif d.mixture == 'temperature':
    weights = mixture.temperature_weights(
        token_counts, d.mixture_temperature, field='data.mixture_temperature'
    )
  elif d.mixture == 'unimax':
    budget = config.train.steps * config.train.global_batch_size * config.train.seq_len
    unimax = mixture.unimax_weights(
        token_counts, budget, d.unimax_max_epochs, field='data.unimax_max_epochs'
    )
    if unimax.warning:
      print(f'UniMax: {unimax.warning}')
    weights = unimax.weights
  elif d.mixture == 'groups':
    groups, shares = _parse_groups(d.mixture_groups)
    weights = mixture.group_share_weights(
        token_counts,
        groups,
        shares,
        d.mixture_min_share,
        field='data.mixture_groups',
    )
  else:
    raise ConfigError(
        f'data.mixture={d.mixture!r} is not one of natural, temperature, unimax, explicit, groups'
    )
  return mixture.MixtureSchedule([(0, weights)], field='data.mixture')


def _parse_groups(text: str):
  """'eng_Latn=0.3;fra_Latn,spa_Latn=0.2;*=0.5' -> (groups, shares), a group
  named by its member list."""
  groups, shares = {}, {}
  for part in filter(None, (p.strip() for p in text.split(';'))):
    members, equals, share = part.rpartition('=')
    try:
      value = float(share)
    except ValueError:
      value = None
    if not equals or not members.strip() or value is None:
      raise ConfigError(
          f'data.mixture_groups: {part!r} is not <languages>=<share>, e.g.'
          " 'eng_Latn=0.3;fra_Latn,spa_Latn=0.2;*=0.5'"
      )
    groups[members.strip()] = members.strip()
    shares[members.strip()] = value
  if not groups:
    raise ConfigError("data.mixture='groups' needs data.mixture_groups")
  return groups, shares


def _load_or_train_tokenizer(
    config: ml_collections.ConfigDict,
    workdir: str,
    train: dict[str, list[str]],
) -> Tokenizer:
  """Loads the configured tokenizer, or trains and saves the workdir's one."""
  vocab_size = config.model.vocab_size
  path = config.data.tokenizer_path or run_tokenizer(workdir)
  if path:
    tokenizer = load_tokenizer(path)
    _check_tokenizer(tokenizer, config, path)
    return tokenizer
  path = os.path.join(workdir, SENTENCEPIECE_MODEL)
  if config.data.tokenizer_type not in MODEL_TYPES:
    raise ConfigError(
        f'data.tokenizer_type={config.data.tokenizer_type!r} is not one of {MODEL_TYPES}.'
    )
  texts = balanced_texts(train, _TOKENIZER_TRAINING_CHARS // len(train))
  print(
      f'Training a {vocab_size}-piece {config.data.tokenizer_type} tokenizer'
      f' on {sum(map(len, texts)):,} characters in {len(train)} languages'
      f' -> {path}'
  )
  return train_sentencepiece(
      texts,
      path,
      vocab_size=vocab_size,
      model_type=config.data.tokenizer_type,
      # Single ids from the start, so the model can be fine-tuned with the default template.
      user_defined_symbols=chat.DEFAULT_TEMPLATE_TOKENS,
  )
