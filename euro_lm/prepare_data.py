"""Prepares raw text for training: tokenized shards per language, a manifest.

  python -m euro_lm.prepare_data --input=GLOB[,GLOB...] --output=DIR \
      --tokenizer=TOKENIZER (--language_field=lang | --language=deu_Latn)
  python -m euro_lm.prepare_data --chat --input=GLOB --output=DIR --tokenizer=TOKENIZER \
      [--chat_template=default|FILE.jinja] [--chat_template_kwargs=JSON] [--language_field=lang]
      [--max_length=N]

With --chat the inputs are conversations (`{"messages": [...]}` records) and each record
of the shards is a conversation's ids and loss mask, rendered with the chat template;
`data.chat_files` takes the output directory.

Tokenizes raw JSONL (plain, .gz, .zst) or Parquet files into ArrayRecord
shards per language and a manifest (see euro_lm.data.prepared). --source_name,
--url, --license, ... (or --source_file) describe where the inputs came from. Re-running the
same command resumes: finished input files are skipped. A truncated input, or
one without documents, is a `warning:` line (with --strict, an error).
"""

import sys

from absl import app, flags

from euro_lm import cli, provenance
from euro_lm.data.prepare import source_flags
from euro_lm.errors import ConfigError

_INPUT = flags.DEFINE_list('input', None, 'Input file globs, comma-separated.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory.')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer',
    None,
    'A SentencePiece .model, a Hugging Face tokenizer.json, or a directory with one (such as'
    " an imported model's <workdir>/tokenizer).",
)
_DOCS_PER_SHARD = flags.DEFINE_integer('docs_per_shard', 50_000, 'Documents per shard.')
_WORKERS = flags.DEFINE_integer(
    'workers', None, 'Processes; default: the CPUs this process may use.'
)
# Where the inputs came from (kept in the manifest; model cards and summaries report it).
_PROVENANCE = {
    field: flags.DEFINE_string(field, None, f'Source description: {meaning}.')
    for field, meaning in provenance.FIELDS.items()
}
_SOURCE_FILE = flags.DEFINE_string(
    'source_file',
    None,
    'A JSON file of the source fields instead of the flags (' + ', '.join(provenance.FIELDS) + ').',
)
_CHAT = flags.DEFINE_bool(
    'chat', False, 'The inputs are conversations, for fine-tuning (data.chat_files).'
)
_MESSAGES_FIELD = flags.DEFINE_string(
    'messages_field', 'messages', "--chat: the field or column of each record's messages."
)
_CHAT_TEMPLATE = flags.DEFINE_string(
    'chat_template',
    '',
    "--chat: '' the tokenizer folder's template (else the default), default (ChatML), or a"
    ' .jinja file.',
)
_CHAT_TEMPLATE_KWARGS = flags.DEFINE_string(
    'chat_template_kwargs',
    '',
    "--chat: the template's other variables, a JSON object such as '{\"enable_thinking\": false}'"
    ' (as data.chat_template_kwargs).',
)
_MAX_LENGTH = flags.DEFINE_integer(
    'max_length',
    0,
    '--chat: longer conversations (in tokens) are too_long bad records; 0: no limit (a run'
    ' leaves out those longer than train.seq_len + 1).',
)
flags.mark_flags_as_required(['input', 'output', 'tokenizer'])


def _source_record():
  given = {field: flag.value for field, flag in _PROVENANCE.items() if flag.present}
  if _SOURCE_FILE.value:
    if given:
      raise ConfigError(f'--source_file and --{next(iter(given))}: give one or the other')
    return provenance.read_source_file(_SOURCE_FILE.value)
  return provenance.source_record(given) if given else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from euro_lm.data import chat, prepared
  from euro_lm.data.prepare import shards

  source_record = _source_record()
  chat_flags = [
      f for f in (_MESSAGES_FIELD, _CHAT_TEMPLATE, _CHAT_TEMPLATE_KWARGS, _MAX_LENGTH) if f.present
  ]
  if not _CHAT.value and chat_flags:
    raise ConfigError(f'--{chat_flags[0].name} is for conversations: add --chat.')
  if _CHAT.value and source_flags.TEXT_FIELD.present:
    raise ConfigError('--text_field is for text: conversations have --messages_field.')
  manifest = shards.prepare(
      _INPUT.value,
      _OUTPUT.value,
      _TOKENIZER.value,
      source_flags.conversation_source(_MESSAGES_FIELD.value)
      if _CHAT.value
      else source_flags.text_source(),
      docs_per_shard=_DOCS_PER_SHARD.value,
      workers=_WORKERS.value,
      progress=True,
      source_record=source_record,
      chat_template=_CHAT_TEMPLATE.value,
      max_length=_MAX_LENGTH.value,
      template_variables=chat.template_variables(
          _CHAT_TEMPLATE_KWARGS.value, '--chat_template_kwargs'
      ),
  )
  print(shards.format_summary(manifest))
  print(f'Manifest: {_OUTPUT.value}/{prepared.MANIFEST}')
  for warning in shards.input_warnings(manifest):
    print(f'warning: {warning}', file=sys.stderr)


if __name__ == '__main__':
  cli.run(main)
