"""A training run's checkpoint, loaded for generation: `load_run(workdir)` then
`complete(run, prompts, ...)` for texts or user messages, or `answer(run, conversations,
...)` for conversations in the run's chat template (what `python -m euro_lm.generate`
calls; usable from notebooks).

The config is the run's `<workdir>/config.json`; the tokenizer the checkpoint's own copy,
else the workdir's, else the config's `data.tokenizer_path`.
"""

import ast
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from euro_lm import records
from euro_lm.checkpoint import find_tokenizer, load_params, resolve_checkpoint
from euro_lm.config import base_config
from euro_lm.data import chat
from euro_lm.data.dataset import chat_template_of_run
from euro_lm.data.tokenizer import Tokenizer, load_tokenizer
from euro_lm.errors import ArgumentError, ConfigError, UserError, read_json_object
from euro_lm.model.decoder import Decoder
from euro_lm.sampling import left_pad, make_generate


class Run(NamedTuple):
  config: ml_collections.ConfigDict
  model: Decoder
  params: Any
  tokenizer: Tokenizer
  step_dir: str
  shardings: Any  # of params


def load_config(workdir, overrides=()):
  """The run's config.json with `overrides` applied: 'section.field=value' strings such as
  'model.attention_impl=xla' or 'mesh.fsdp=8'; a value is a Python literal, else text."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'no config.json in {workdir}: is it a euro_lm training workdir?')
  config = ml_collections.ConfigDict(read_json_object(path, UserError))
  # A run from an older euro_lm lacks the fields added since: they take their defaults.
  for section, fields in base_config().items():
    if section not in config:
      config[section] = fields
    elif isinstance(fields, ml_collections.ConfigDict):
      for field, default in fields.items():
        if field not in config[section]:
          config[section][field] = default
  for override in overrides:
    name, sep, text = override.partition('=')
    section, _, field = name.partition('.')
    if not sep or section not in config or field not in config[section]:
      raise ConfigError(f'{override!r}: not section.field=value of a field in {path}')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = {'true': True, 'false': False}.get(text.lower(), text)
    try:
      config[section][field] = value
    except TypeError as e:
      raise ConfigError(f'{override!r}: {e}') from None
  return config


def load_run(workdir, step=None, *, config=None, mesh=None, rules=None):
  """The config, model, params, tokenizer and step directory of a run's newest checkpoint,
  or of `step`. The params land on the first device, or sharded over `mesh` by the logical
  axis `rules`; `config` replaces the workdir's (see `load_config`)."""
  workdir = os.path.abspath(workdir)
  config = config or load_config(workdir)
  step_dir = resolve_checkpoint(workdir, step)
  model = Decoder(config.model)
  boxed = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))['params'], jax.random.key(0)
  )
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.unbox(boxed))
  else:
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  abstract = jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      nn.unbox(boxed),
      shardings,
  )
  params, step_dir = load_params(step_dir, abstract)
  tokenizer_path = find_tokenizer(step_dir, workdir, config.data.tokenizer_path)
  if not tokenizer_path:
    raise UserError(
        f'no tokenizer for {workdir}: not in {step_dir}, the workdir or data.tokenizer_path'
    )
  tokenizer = load_tokenizer(tokenizer_path)
  return Run(config, model, params, tokenizer, str(step_dir), shardings)


def chat_template(run) -> str:
  """The template a fine-tuning run trained with, else its tokenizer folder's (or the
  default, see euro_lm.data.chat.chat_template_for)."""
  workdir = os.path.dirname(os.path.dirname(run.step_dir))
  return chat_template_of_run(workdir) or chat.chat_template_for(run.tokenizer)


def chat_variables(run) -> dict:
  """The template variables the run fine-tuned with (data.chat_template_kwargs)."""
  return chat.template_variables(
      run.config.data.get('chat_template_kwargs', ''), 'data.chat_template_kwargs'
  )


# Sampling settings `complete` and `answer` take, and their defaults.
SAMPLING = dict(max_new_tokens=64, temperature=0.8, top_k=0, top_p=0.95, seed=0, batch_size=None)
# Several batches: prompt widths are rounded up to a multiple of this, so that batches share
# compiled shapes (left padding is masked: answers do not change).
PROMPT_WIDTH_MULTIPLE = 64


def complete(
    run,
    prompts,
    *,
    chat_messages=False,
    system='',
    tools=None,
    template_variables=None,
    **sampling,
):
  """The completion text of each prompt (without the prompt and the stop id). With
  `chat_messages` each prompt is a user message, after a `system` message if one is given,
  answered as by `answer` with `tools` (a list of tool schemas) for every prompt and
  `template_variables`. A row ends at EOS or the template's end of turn (without
  `chat_messages`, the template a run fine-tuned with, if any: where its export stops).

  `sampling`: `SAMPLING`'s settings (`temperature=0` is greedy; `top_k` 0 and `top_p` 1 are
  off), and `on_batch`. The prompts run `batch_size` at a time, in order (None: all in
  one batch); batch k samples with the key `jax.random.fold_in(jax.random.key(seed), k)`,
  so a prompt's sample depends on the seed, the batch size and the prompts of its own
  batch only. Greedy answers are the same whatever the batch size. `on_batch(k, batches,
  texts)`, if given, gets each batch's texts as they come (to write or report them)."""
  if chat_messages:
    return answer(
        run,
        [user_turn(p, system) for p in prompts],
        tools=[tools] * len(prompts),
        names=[f'prompt {p!r}' for p in prompts],
        template_variables=template_variables,
        **sampling,
    )
  if system or tools is not None or template_variables is not None:
    raise UserError('a system message, tools and template variables need chat_messages')
  tok = run.tokenizer
  template = chat_template_of_run(os.path.dirname(os.path.dirname(run.step_dir)))
  bos = [tok.bos_id] if run.config.data.add_bos else []
  ids = [bos + tok.encode(p) for p in prompts]
  return _sample(run, ids, template, chat_variables(run) if template else {}, **sampling)


def user_turn(prompt, system=''):
  """The messages of a user's `prompt`, after a `system` message if one is given."""
  before = [{'role': 'system', 'content': system}] if system else []
  return [*before, {'role': 'user', 'content': prompt}]


def prompt_ids(run, conversations, *, tools=None, names=None, template_variables=None):
  """(the ids each conversation is answered from, the template, its variables): each
  conversation a list of messages (as euro_lm.data.conversations checks them with
  `prompt=True`) that ends with a user message or a tool result, rendered with
  `chat_template(run)`, its generation prompt, the run's template variables
  (`chat_variables`) updated with `template_variables`, and the conversation's `tools`
  (one list of schemas, or None, per conversation).

  Raises:
    ConversationError: a conversation the template refuses or renders without what one of
      its messages says, named by `names` (e.g. file:line), else by its index.
  """
  tools = [None] * len(conversations) if tools is None else tools
  names = names or [f'conversation {k}' for k in range(len(conversations))]
  if not len(conversations) == len(tools) == len(names):
    raise ValueError(
        f'{len(conversations)} conversations, {len(tools)} tool lists, {len(names)} names'
    )
  template = chat_template(run)
  variables = {**chat_variables(run), **(template_variables or {})}
  ids = []
  for messages, conversation_tools, name in zip(conversations, tools, names):
    try:
      ids.append(
          chat.encode_prompt(run.tokenizer, template, messages, conversation_tools, **variables)
      )
    except chat.ConversationError as e:
      raise chat.ConversationError(e.kind, f'{name}: {e}') from None
  return ids, template, variables


def answer(run, conversations, *, tools=None, names=None, template_variables=None, **sampling):
  """The assistant's answer to each conversation, from `prompt_ids` (which says what the
  arguments are and what it raises); sampling, `batch_size` and `on_batch` as
  `complete`'s. The text ends before EOS or the template's end of turn; a tool call is the
  text the model writes for it."""
  if not conversations:
    return []
  ids, template, variables = prompt_ids(
      run, conversations, tools=tools, names=names, template_variables=template_variables
  )
  return _sample(run, ids, template, variables, **sampling)


def _sample(
    run,
    ids,
    template,
    variables,
    *,
    on_batch: Callable[[int, int, list[str]], None] | None = None,
    **sampling,
):
  """The decoded continuation of each row of `ids`, without the stop ids (those of the
  template with its `variables` among them): `batch_size` rows at a time as left-padded
  batches (None: one), batch k sampled with `fold_in(key(seed), k)`; see `complete`."""
  unknown = sorted(set(sampling) - set(SAMPLING))
  if unknown:
    raise ArgumentError(f'unknown sampling settings {unknown}; known: {sorted(SAMPLING)}')
  settings = SAMPLING | sampling
  batch_size, seed = settings.pop('batch_size'), settings.pop('seed')
  if batch_size is not None and batch_size < 1:
    raise ArgumentError(f'batch_size must be >= 1 (None: one batch), got {batch_size}')
  tok = run.tokenizer
  stops = chat.stop_ids(tok.eos_id, tok, template, records.base_model_at(run.step_dir), variables)
  pad_id = max(tok.pad_id, 0)
  # One jitted function for every batch: it compiles once per batch shape.
  sample = make_generate(
      run.model, eos_id=stops, num_tokens=tok.vocab_size, pad_id=pad_id, **settings
  )
  size = batch_size or max(len(ids), 1)
  starts = range(0, len(ids), size)
  multiple = PROMPT_WIDTH_MULTIPLE if len(starts) > 1 else 1
  texts = []
  for k, start in enumerate(starts):
    tokens_BP, lengths_B = left_pad(ids[start : start + size], pad_id, multiple)
    key = jax.random.fold_in(jax.random.key(seed), k)
    out = sample(run.params, tokens_BP, lengths_B, key)
    tokens_BN, lengths_B = np.asarray(out.tokens_BN), np.asarray(out.lengths_B)
    batch = [
        tok.decode([int(t) for t in row[:length] if t not in stops])
        for row, length in zip(tokens_BN, lengths_B)
    ]
    if on_batch:
      on_batch(k, len(starts), batch)
    texts.extend(batch)
  return texts
