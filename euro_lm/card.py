"""A model card and the training-content summary, from a checkpoint's records.

`write_card(output, report)` writes into an exported folder:
  README.md                     a Hugging Face model card: YAML metadata (language, license,
                                base_model, datasets, pipeline_tag, library_name,
                                model-index) and prose filled from the records
  training_content_summary.json the public summary of training content, in the structure
                                of the AI Office's template (general information; data
                                sources by category; data processing)
  training_content_summary.md   the same, to read
What the records cannot know is `provenance.UNKNOWN`, for the provider to complete, never
a guess. A provider's file (`extra`, Markdown) merges in: its YAML metadata fills or
overrides the card's (a `summary:` mapping merges into the summary), and each of its `## `
sections replaces the card's section of that title, or is added at the end.
"""

import json
import os
import re

from euro_lm import provenance, records
from euro_lm.data.streams import stream_language

README = 'README.md'
SUMMARY_JSON = 'training_content_summary.json'
SUMMARY_MD = 'training_content_summary.md'
TEMPLATE = (
    'AI Office, Template for the Public Summary of Training Content for general-purpose AI '
    'models (Article 53(1)(d) of the AI Act)'
)
U = provenance.UNKNOWN


def _size_band(tokens):
  """The template's size range for text."""
  if tokens is None:
    return U
  if tokens < 10**9:
    return 'Less than 1 billion tokens'
  if tokens <= 10 * 10**12:
    return '1 billion to 10 trillion tokens'
  return 'More than 10 trillion tokens'


def _hub_dataset(url):
  match = re.match(r'https://huggingface\.co/datasets/([\w.-]+/[\w.-]+|[\w.-]+)/?$', url or '')
  return match.group(1) if match else None


def _latest_collection(sources):
  """The end of the latest collection period, if every source states one."""
  ends = [(s.get('collected') or '').split('..')[-1] for s in sources.values()]
  return max(ends) if ends and all(ends) else U


def _trained(report):
  """The languages the model was trained on up to the report's step (tokens drawn)."""
  return [t for t, e in report['languages'].items() if e['tokens']]


def _sizes(size):
  """A source's size per language, one line: `deu_Latn 1,204 documents, 31,507 tokens; ...`."""
  parts = []
  for tag, s in sorted(size.items()):
    documents = s.get('documents', s.get('training_documents'))
    tokens = s.get('tokens', s.get('training_tokens'))
    counts = [f'{documents:,} documents'] if documents is not None else []
    counts += [f'{tokens:,} tokens'] if tokens is not None else []
    parts.append(f'{tag} {", ".join(counts) or U}')
  return '; '.join(parts) or U


def summary(report: dict) -> dict:
  """The training-content summary (JSON-able) of a records report (euro_lm.records)."""
  tr = report['training']
  sources = report['sources']
  languages = sorted({stream_language(t) for t in _trained(report)})
  content = sorted({s.get('content_type') or U for s in sources.values()})
  by_category = {key: [] for key in provenance.CATEGORIES}
  by_category['not_categorised'] = []
  for name, s in sources.items():
    entry = {
        'name': name,
        **{f: s.get(f) or U for f in provenance.FIELDS if f not in ('source_name', 'category')},
        'languages': s['languages'],
        'size': s.get('size')
        or {
            stream_language(t): {
                'training_documents': report['languages'][t]['training_documents'],
                'training_tokens': report['languages'][t]['training_tokens'],
            }
            for t in s['epochs']
        },
        'tokens_trained': s['tokens_trained'],
        'epochs': s['epochs'],
    }
    by_category[s.get('category') or 'not_categorised'].append(entry)
  base = report['base_model']
  return {
      'template': TEMPLATE,
      'generated_from': {'checkpoint': report['checkpoint'], 'step': report['step']},
      'general_information': {
          'provider': {'name': U, 'contact': U},
          'model': {
              'name': U,
              'version': f'step {report["step"]}',
              'base_model': (base.get('name') or U) if base else None,
              'base_model_license': (base.get('license') or U) if base else None,
              'date_placed_on_market': U,
          },
          'modalities': ['text'],
          'training_data_size': {
              'tokens_trained': tr['content_tokens'] if tr['content_tokens'] is not None else U,
              'band': _size_band(tr['content_tokens']),
          },
          'types_of_content': content,
          'latest_collection_date': _latest_collection(sources) if sources else U,
          'languages': languages,
          'other_characteristics': U,
      },
      'data_sources': by_category,
      'data_processing': {
          'tdm_rights_reservations': U,
          'illegal_content_removal': U,
          'other': {
              'filtering': {name: s.get('filtering') or U for name, s in sources.items()},
              'held_out_for_validation': (
                  f'every {round(1 / tr["valid_fraction"])}th document of each language'
                  if tr.get('valid_fraction')
                  else U
              ),
              'training': {
                  'steps': tr['steps'],
                  'tokens': tr['tokens'] if tr['tokens'] is not None else U,
                  'flops': tr['flops'] if tr['flops'] is not None else U,
                  'device_hours': tr['device_hours'] if tr['device_hours'] is not None else U,
                  'hardware': tr['hardware'],
              },
          },
      },
  }


def _merge(base, extra):
  """`extra` merged into `base` (mappings deeply, anything else replaced)."""
  merged = dict(base)
  for key, value in extra.items():
    if isinstance(value, dict) and isinstance(merged.get(key), dict):
      merged[key] = _merge(merged[key], value)
    else:
      merged[key] = value
  return merged


def _metadata(report, name):
  languages = sorted(
      {records.language_code(t) for t in _trained(report)} - {None},
  )
  meta = {
      **({'language': languages} if languages else {}),
      'library_name': 'transformers',
      'pipeline_tag': 'text-generation',
      'tags': ['euro_lm'],
  }
  base = report['base_model']
  if base and re.match(r'[\w.-]+/[\w.-]+$', base.get('name') or ''):  # a hub id, not a folder
    meta['base_model'] = base['name']
  datasets = sorted(
      {_hub_dataset(s.get('url')) for s in report['sources'].values()} - {None},
  )
  if datasets:
    meta['datasets'] = datasets
  results = _model_index(report)
  if results:
    meta['model-index'] = [{'name': name, **results}]
  return meta


def _model_index(report):
  evaluation = report['evaluation'] or {}
  results = []
  valid = evaluation.get('valid')
  if valid:
    results.append(
        {
            'task': {'type': 'text-generation', 'name': 'Language modelling'},
            'dataset': {
                'type': 'held-out-training-sources',
                'name': f'Held-out documents of the training sources (step {valid["step"]})',
            },
            'metrics': [
                {'type': k.split('/')[-1], 'name': k, 'value': float(v)}
                for k, v in valid.items()
                if k != 'step' and isinstance(v, (int, float))
            ],
        }
    )
  harness = evaluation.get('harness')
  if harness:
    tasks = {}
    for k, v in harness.items():
      if k != 'step' and isinstance(v, (int, float)):
        _, task, metric = (k.split('/', 2) + ['', ''])[:3]
        tasks.setdefault(task, []).append({'type': metric or 'score', 'name': k, 'value': v})
    for task, metrics in sorted(tasks.items()):
      results.append(
          {
              'task': {'type': 'text-generation'},
              'dataset': {'type': task, 'name': f'{task} (lm-evaluation-harness)'},
              'metrics': metrics,
          }
      )
  return {'results': results} if results else None


def _yaml(meta):
  import yaml  # pylint: disable=import-outside-toplevel

  return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _number(value, fmt='{:,}'):
  return U if value is None or value == U else fmt.format(value)


def _chat_line(variables):
  """The card's line on how to talk to a model fine-tuned on conversations: its template,
  and the template `variables` it was trained with, which no HF file carries."""
  line = (
      '- Chat: fine-tuned on conversations in the chat template of `chat_template.jinja` (also '
      "`tokenizer_config.json`'s `chat_template`)"
  )
  if not variables:
    return line
  return (
      f'{line}, rendered with the template variables `{json.dumps(variables, sort_keys=True)}`:'
      " pass the same to `apply_chat_template(messages, **variables)` and as a server's"
      ' `chat_template_kwargs`'
  )


def _sections(report, summary_, chat_variables=None):
  """[(title, Markdown)] of the card's prose; `chat_variables` as `write_card`'s."""
  g = summary_['general_information']
  tr = report['training']
  m = report['model']
  base = report['base_model']
  trained = (
      f'trained with euro_lm to step {report["step"]} on rows of {m["seq_len"]} tokens'
      if report['step']
      else 'imported into euro_lm and not trained further'
  )
  overview = [
      f'A decoder-only language model of {m["parameters"]:,} parameters ({m["layers"]} layers, '
      f'width {m["embed_dim"]}, vocabulary {m["vocab_size"]:,}), {trained}.',
      '',
      f'- Provider: {g["provider"]["name"]}',
      f'- Licence: {U}',
      f'- Languages: {", ".join(g["languages"]) or U}',
  ]
  if base:
    overview.append(
        f'- Base model: {base.get("name") or U} (its licence: {base.get("license") or U})'
    )
  if chat_variables is not None:
    overview.append(_chat_line(chat_variables))
  tokens = f'- Tokens: {_number(tr["tokens"])}'
  if tr['content_tokens'] != tr['tokens']:
    tokens += f' in training rows, {_number(tr["content_tokens"])} of them from documents'
  training = [
      f'- Steps: {tr["steps"]:,}',
      tokens,
      f'- Training compute: {_number(tr["flops"], "{:.3e}")} FLOPs (the model\'s count: '
      'forward and backward matmuls and attention, recomputation not counted)',
      f'- Device-hours: {_number(tr["device_hours"], "{:.4g}")} (wall-clock, counted up to '
      'each checkpoint)',
  ]
  if tr['recorded_from_step']:
    training.append(f'- Records start at step {tr["recorded_from_step"]}: earlier steps unknown')
  for h in tr['hardware']:
    training.append(
        f'- Hardware: {h["devices"]} x {h["device_kind"]} ({h["platform"]}), '
        f'{h["steps"]:,} steps, {h["device_hours"]:.4g} device-hours'
    )
  data = [
      '| language | tokens trained | documents drawn | epochs | source |',
      '|---|---:|---:|---:|---|',
  ]
  for tag, e in report['languages'].items():
    epochs = U if e['epochs'] is None else f'{e["epochs"]:.3f}'
    data.append(f'| {tag} | {e["tokens"]:,} | {e["documents"]:,} | {epochs} | {e["source"] or U} |')
  data.append('')
  for name, s in report['sources'].items():
    data.append(
        f'- **{name}**: {s.get("description") or U} ({s.get("url") or U}); licence '
        f'{s.get("license") or U}; collected {s.get("collected") or U}; content '
        f'{s.get("content_type") or U}; filtering: {s.get("filtering") or U}'
    )
  data.append('')
  data.append(f'The full summary of training content is in `{SUMMARY_MD}` and `{SUMMARY_JSON}`.')
  evaluation = report['evaluation'] or {}
  results = []
  if 'valid' in evaluation:
    valid = evaluation['valid']
    results.append(f'Held-out validation at step {valid["step"]} (loss in nats per token, bpb in '
                   'bits per UTF-8 byte):')  # fmt: skip
    results.append('')
    results.append('| metric | value |')
    results.append('|---|---:|')
    results += [f'| {k} | {v:.4f} |' for k, v in valid.items() if k != 'step']
  if 'harness' in evaluation:
    harness = evaluation['harness']
    results.append('')
    results.append(f'lm-evaluation-harness at step {harness["step"]}:')
    results += [
        f'- {k}: {v:.4f}' for k, v in harness.items() if k != 'step' and isinstance(v, (int, float))
    ]
  return [
      ('Model', '\n'.join(overview)),
      ('Intended uses and limitations', U),
      ('Training', '\n'.join(training)),
      ('Training data', '\n'.join(data)),
      ('Evaluation', '\n'.join(results) or U),
      ('Risks, biases and mitigations', U),
      ('Contact', U),
  ]


def _summary_markdown(s):
  g = s['general_information']
  lines = [
      '# Public summary of training content',
      '',
      f'Following the structure of the {s["template"]}. Filled from the training run\'s '
      f'records at step {s["generated_from"]["step"]}; fields marked {U} are for the '
      'provider to complete.',
      '',
      '## 1. General information',
      '',
      f'- Provider: {g["provider"]["name"]}; contact: {g["provider"]["contact"]}',
      f'- Model: {g["model"]["name"]}, version {g["model"]["version"]}; base model: '
      f'{g["model"]["base_model"] or "none"}; placed on the market: '
      f'{g["model"]["date_placed_on_market"]}',
      f'- Modalities: {", ".join(g["modalities"])}',
      f'- Training data size: {_number(g["training_data_size"]["tokens_trained"])} tokens '
      f'trained ({g["training_data_size"]["band"]})',
      f'- Types of content: {", ".join(g["types_of_content"])}',
      f'- Latest date of data collection: {g["latest_collection_date"]}',
      f'- Languages: {", ".join(g["languages"])}',
      f'- Other characteristics: {g["other_characteristics"]}',
      '',
      '## 2. List of data sources',
  ]
  for key, title in [*provenance.CATEGORIES.items(), ('not_categorised', f'Not categorised {U}')]:
    lines += ['', f'### {title}', '']
    entries = s['data_sources'][key]
    if not entries:
      lines.append('None.')
    for e in entries:
      lines.append(f'- **{e["name"]}**: {e["description"]} ({e["url"]})')
      lines.append(f'  - licence: {e["license"]}; collected: {e["collected"]}')
      lines.append(f'  - content: {e["content_type"]}; languages: {", ".join(e["languages"])}')
      lines.append(f'  - tokens trained: {e["tokens_trained"]:,}; size: {_sizes(e["size"])}')
  p = s['data_processing']
  lines += [
      '',
      '## 3. Data processing aspects',
      '',
      f'- Respect of reservations of rights from the text and data mining exception: '
      f'{p["tdm_rights_reservations"]}',
      f'- Removal of illegal content: {p["illegal_content_removal"]}',
      f'- Held out for validation: {p["other"]["held_out_for_validation"]}',
  ]
  lines += [f'- Filtering of {name}: {text}' for name, text in p['other']['filtering'].items()]
  t = p['other']['training']
  lines.append(
      f'- Training: {t["steps"]:,} steps, {_number(t["tokens"])} tokens, '
      f'{_number(t["flops"], "{:.3e}")} FLOPs, {_number(t["device_hours"], "{:.4g}")} '
      'device-hours'
  )
  return '\n'.join(lines) + '\n'


def read_extra(path: str) -> tuple[dict, list[tuple[str, str]]]:
  """(metadata, [(title, text)]) of a provider's Markdown file.

  Raises:
    ConfigError: unreadable, or its metadata block is not a YAML mapping.
  """
  from euro_lm.errors import ConfigError  # pylint: disable=import-outside-toplevel

  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f'--card_extra={path}: cannot be read: {e}') from None
  meta, body = provenance.split_front_matter(text, f'--card_extra={path}')
  parts = re.split(r'^## +(.+?)\s*$', body, flags=re.M)
  sections = [(parts[i].strip(), parts[i + 1].strip()) for i in range(1, len(parts), 2)]
  if parts[0].strip():
    sections.insert(0, ('Notes from the provider', parts[0].strip()))
  return meta, sections


def write_card(
    output: str, report: dict, extra: str | None = None, chat_variables: dict | None = None
) -> dict:
  """Writes README.md and the summary (JSON and Markdown) into `output`; returns the
  summary. `chat_variables` (the template variables, {} for none) is for a model
  fine-tuned on conversations: the card says how to prompt it."""
  extra_meta, extra_sections = read_extra(extra) if extra else ({}, [])
  summary_ = _merge(summary(report), extra_meta.pop('summary', None) or {})
  name = summary_['general_information']['model']['name']
  if name == U:
    name = os.path.basename(os.path.normpath(output))
  meta = _merge(_metadata(report, name), extra_meta)
  sections = _sections(report, summary_, chat_variables)
  if extra:
    titles = [title for title, _ in sections]
    for title, text in extra_sections:
      if title in titles:
        sections[titles.index(title)] = (title, text)
      else:
        sections.append((title, text))
  if 'license' in meta:
    sections = [
        (t, text.replace(f'- Licence: {U}', f'- Licence: {meta["license"]}'))
        for t, text in sections
    ]
  body = [f'# {name}', '']
  for title, text in sections:
    body += [f'## {title}', '', text, '']
  with open(os.path.join(output, README), 'w', encoding='utf-8') as f:
    f.write(f'---\n{_yaml(meta)}---\n\n' + '\n'.join(body))
  with open(os.path.join(output, SUMMARY_JSON), 'w', encoding='utf-8') as f:
    json.dump(summary_, f, indent=2, ensure_ascii=False)
    f.write('\n')
  with open(os.path.join(output, SUMMARY_MD), 'w', encoding='utf-8') as f:
    f.write(_summary_markdown(summary_))
  return summary_
