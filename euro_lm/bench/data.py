"""`python -m euro_lm.bench.data [--scales=5,20] [--workdir=DIR]`

Measures the data path on this machine and prints one table:
- prepare: raw JSONL (.zst, two files) -> tokenized ArrayRecord shards, with 1 and with 2
  workers (tokens/s);
- streams: prepared shards -> mixture -> packing -> batches, one thread (tokens/s per core);
- the streaming process's peak RSS, at each corpus scale (it should not grow with the corpus).
The corpus is the embedded one repeated `scale` times (each copy a distinct document).
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import zstandard
from absl import flags

from euro_lm import cli

_SCALES = flags.DEFINE_list(
    'scales', ['5', '20'], 'Corpus sizes, as copies of the embedded corpus.'
)
_WORKDIR = flags.DEFINE_string('workdir', '', 'Scratch directory (default: a temporary one).')
_STREAM_ONLY = flags.DEFINE_string(
    'stream_only', '', 'Internal: time streaming from this prepared dir.'
)
_VOCAB = flags.DEFINE_integer('vocab_size', 16_000, 'Tokenizer vocabulary.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 2048, 'Row length for streaming.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Rows per batch for streaming.')
_BATCHES = flags.DEFINE_integer('batches', 100, 'Batches to time.')


def write_corpus(paths, docs_by_lang, scale):
  """`scale` copies of every document, marked so that each copy is a distinct document,
  dealt round-robin over the files in `paths`."""
  files = [zstandard.open(path, 'wt', encoding='utf-8') for path in paths]
  for copy in range(scale):
    for tag, docs in sorted(docs_by_lang.items()):
      for doc in docs:
        record = json.dumps({'text': f'{copy}\n{doc}', 'lang': tag}, ensure_ascii=False)
        files[copy % len(files)].write(record + '\n')
  for f in files:
    f.close()


def time_prepare(raw, out, model, workers):
  from euro_lm.data.prepare import shards as prepare
  from euro_lm.data.prepare import sources

  start = time.perf_counter()
  manifest = prepare.prepare(
      raw, out, model, sources.TextSource(language_field='lang'), workers=workers
  )
  return manifest, time.perf_counter() - start


def time_streams(prepared_dir, seq_len, batch, batches):
  """Tokens/s of one thread producing packed batches, and the process's peak RSS in MiB."""
  from euro_lm.data import prepared as prepare
  from euro_lm.data.streams import PackedStreams, process_streams

  manifest = prepare.read_manifest(prepared_dir)
  sources = {tag: prepare.document_source(prepared_dir, tag) for tag in manifest['languages']}
  counts = {tag: entry['tokens'] for tag, entry in manifest['languages'].items()}
  mean = {tag: e['tokens'] / e['documents'] for tag, e in manifest['languages'].items()}
  streams = PackedStreams(
      sources,
      lambda step: counts,
      mean_document_tokens=mean,
      seq_len=seq_len,
      num_streams=batch,
      streams=process_streams(batch, 0, 1),
      seed=0,
      bos_id=manifest['tokenizer']['bos_id'],
      eos_id=manifest['tokenizer']['eos_id'],
  )
  next(streams)  # warm-up: opens the shards
  start = time.perf_counter()
  for _ in range(batches):
    next(streams)
  seconds = time.perf_counter() - start
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return batches * batch * seq_len / seconds, peak_mib


def main(argv):
  del argv
  if _STREAM_ONLY.value:
    rate, peak = time_streams(_STREAM_ONLY.value, _SEQ_LEN.value, _BATCH.value, _BATCHES.value)
    print(json.dumps({'tokens_per_second': rate, 'peak_rss_mib': peak}))
    return
  from euro_lm.data import corpus
  from euro_lm.data.tokenizer import train_sentencepiece

  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='euro_lm_bench_data_')
  docs = corpus.load_embedded_corpus()
  model = os.path.join(workdir, 'tokenizer.model')
  if not os.path.exists(model):
    train_sentencepiece([d for ds in docs.values() for d in ds], model, vocab_size=_VOCAB.value)
  print(
      '| corpus | documents | tokens | prepare tok/s, 1 worker | prepare tok/s, 2 workers '
      '| stream tok/s (1 thread) | stream peak RSS MiB |\n|---|---|---|---|---|---|---|'
  )
  for scale in map(int, _SCALES.value):
    raw = [os.path.join(workdir, f'raw_{scale}_{i}.jsonl.zst') for i in range(2)]
    out = os.path.join(workdir, f'prepared_{scale}')
    write_corpus(raw, docs, scale)
    manifest, one_worker = time_prepare(raw, out, model, workers=1)
    _, two_workers = time_prepare(raw, out + '_2', model, workers=2)
    tokens = sum(e['tokens'] for e in manifest['languages'].values())
    documents = sum(e['documents'] for e in manifest['languages'].values())
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'euro_lm.bench.data',
            f'--stream_only={out}',
            f'--seq_len={_SEQ_LEN.value}',
            f'--batch={_BATCH.value}',
            f'--batches={_BATCHES.value}',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    stream = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f'| embedded x{scale} | {documents:,} | {tokens:,} | {tokens / one_worker:,.0f} '
        f'| {tokens / two_workers:,.0f} | {stream["tokens_per_second"]:,.0f} '
        f'| {stream["peak_rss_mib"]:.0f} |'
    )


if __name__ == '__main__':
  cli.run(main)
