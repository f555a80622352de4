"""The config schema (every field, its default, a one-line comment) and the checks that
run before anything compiles.

Presets (the repository's `configs/*.py`, or any file with `get_config(arg=None)`) start
from `base_config()` and override fields, never add them.
"""

import importlib.util
import math
import os

import ml_collections

from euro_lm.data import chat, mixture
from euro_lm.errors import ConfigError
from euro_lm.model import lora
from euro_lm.model.attention import AttentionError, head_dim, resolve_for_model
from euro_lm.model.decoder import REMAT_POLICIES
from euro_lm.model.layers import MLP_ACTIVATIONS, ROPE_SCALINGS
from euro_lm.sharding import MESH_AXES, MeshError, batch_mesh_axes, logical_rules, mesh_shape

COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
SCHEDULES = ('cosine', 'wsd', 'constant')
CORPORA = ('embedded', 'prepared')
# Model fields that say how a run computes, not what the model is: `train.model_from_init`
# keeps this config's.
MODEL_RUN_FIELDS = (
    'compute_dtype',
    'attention_impl',
    'pallas_backend',
    'remat_policy',
    'loss_chunk_length',
    'fp8',
    'lora_rank',
    'lora_alpha',
    'lora_targets',
)


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default and a one-line comment; presets override, never add."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 32_000  # tokenizer and embedding size
  m.num_layers = 12  # decoder blocks
  m.embed_dim = 768  # model width D
  m.num_heads = 12  # query heads H
  m.num_kv_heads = 12  # key/value heads K (grouped-query attention); divides H
  m.head_dim = 64  # per-head width; 0 means embed_dim // num_heads
  m.mlp_dim = 2048  # SwiGLU hidden width F
  m.rope_theta = 10_000.0  # RoPE base frequency
  m.rope_scaling = (
      'none'  # RoPE frequency scaling, as HF's rope_type: none | linear | llama3 | yarn
  )
  m.rope_scaling_factor = 1.0  # linear, llama3, yarn: how many times the original context
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths over original / this are scaled fully
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths under original / this are kept
  m.rope_original_max_positions = 8192  # llama3, yarn: the context the model was first trained on
  m.rope_yarn_beta_fast = 32.0  # yarn: dimensions turning more often than this are kept
  m.rope_yarn_beta_slow = 1.0  # yarn: dimensions turning less often than this are scaled fully
  m.rope_yarn_truncate = True  # yarn: round the blended range of dimensions outwards
  m.rope_attention_factor = 0.0  # yarn: cos and sin times this; 0: 0.1 * ln(factor) + 1
  # >0: queries times 1 + this * ln(1 + floor(position / rope_original_max_positions)), after
  # RoPE (Llama 4's long-context scaling, Ministral 3's llama_4_scaling_beta); 0: off
  m.query_scale_beta = 0.0
  m.norm_eps = 1e-5  # RMSNorm epsilon
  m.tie_embeddings = True  # share input embedding and output projection
  m.qk_norm = False  # RMSNorm on queries and keys per head
  m.qkv_bias = False  # biases on the query, key and value projections (as Qwen2)
  m.sliding_window = 0  # >0: each token attends to at most this many, itself included (Mistral)
  m.sliding_window_pattern = 0  # >0: every Nth layer is global (full attention, rope_theta);
  # the others are local (sliding_window, rope_local_theta), as Gemma 3; 0: all layers alike
  m.rope_local_theta = 0.0  # RoPE base of the local layers, unscaled; 0: as the global ones
  m.nope_interval = 0  # >0: every Nth layer has no position embedding (NoPE, SmolLM3); 0: none
  m.norm_plus_one = False  # RMSNorms scale by (1 + scale), scale stored from 0 (Gemma)
  m.post_norms = False  # also RMSNorm the attention and MLP outputs before each residual add
  m.scale_embeddings = False  # multiply the input embeddings by sqrt(embed_dim) (Gemma)
  # the MLP: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma) gate the up projection; xielu has
  # no gate, down(xIELU(up(x))) (Apertus)
  m.mlp_activation = 'silu'
  m.query_pre_attn_scalar = 0  # attention logits times this ** -0.5; 0 means head_dim
  m.attn_logit_softcap = 0.0  # >0: attention scores become cap * tanh(scores / cap) (Gemma 2)
  m.final_logit_softcap = 0.0  # >0: output logits become cap * tanh(logits / cap) (Gemma 2)
  m.init_std = 0.02  # normal init std for weights
  m.compute_dtype = 'float32'  # activations/matmuls: float32 | bfloat16 | float16
  m.attention_impl = 'xla'  # xla (reference) | cudnn | pallas (euro_lm.kernels) | auto
  m.pallas_backend = 'auto'  # pallas kernels: auto (by device) | gpu (Triton) |
  # mosaic_gpu (Hopper) | tpu
  m.remat_policy = (
      'none'  # none | full | dots | dots_no_batch | save_attention_out | dots_and_attention
  )
  m.loss_chunk_length = 0  # >0: output projection + loss fused, this many positions
  # at a time (no [B, L, V] logits); 0: all logits at once
  m.fp8 = False  # q/k/v/o and MLP matmuls in fp8 (delayed scaling; euro_lm.model.fp8):
  # bfloat16 compute on Hopper or newer NVIDIA GPUs (and CPU, emulated); attention stays bf16
  m.lora_rank = 0  # >0: LoRA adapters of this rank; only they train (0: full fine-tuning)
  m.lora_alpha = 16.0  # LoRA: the adapters' product is scaled by lora_alpha / lora_rank
  # LoRA: the projections that get adapters (gate only where the MLP has one: not xielu)
  m.lora_targets = 'q,k,v,o,gate,up,down'

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000  # optimizer steps
  t.global_batch_size = 64  # sequences per optimizer step, over all devices
  t.seq_len = 1024  # tokens per sequence
  t.grad_accum_steps = 1  # micro-batches per step (each global_batch_size / this)
  t.seed = 0  # parameter init and dropout-free step RNG
  t.log_every = 10  # steps between metric records
  t.eval_every = 200  # steps between validation passes; 0 disables
  t.eval_batches = 4  # batches per language per validation pass
  t.checkpoint_every = 500  # steps between checkpoints; 0 disables (final always saved)
  t.checkpoint_every_minutes = 0.0  # also save once this many minutes passed since the last; 0 off
  t.keep_checkpoints = 3  # newest checkpoints kept on disk
  t.keep_checkpoints_every = 0  # also keep every step that is a multiple of this; 0 off
  t.save_failure = 'stop'  # failed checkpoint save: stop (at the next step) | retry (once)
  t.resume_fallback = False  # newest checkpoint corrupt: resume from the newest intact one
  t.init_from = ''  # new run: parameters from this checkpoint (workdir or step dir)
  t.model_from_init = False  # the model's architecture fields from init_from's config (not
  # MODEL_RUN_FIELDS: dtype, attention, remat, loss chunking, LoRA stay this config's)
  t.nonfinite_policy = 'stop'  # non-finite loss/gradient: stop | skip (the update)
  t.max_skipped_in_a_row = 10  # skip: stop after more consecutive skipped updates than this
  t.skip_grad_norm_above = 0.0  # skip: also skip updates whose gradient norm exceeds this; 0 off
  t.profile_start_step = 0  # >0: trace steps [this, this + profile_steps) with the JAX
  # profiler into workdir/tensorboard; 0 off
  t.profile_steps = 3  # steps in that trace
  t.harness_tasks = ''  # lm-eval tasks run on the training params, comma-separated; '' off
  t.harness_every = 0  # steps between those runs; 0: at the last step only
  t.harness_include_path = ''  # a folder of your own lm-eval task YAMLs (local data)
  t.harness_limit = 0  # at most this many documents per task; 0: all

  c.optimizer = o = ml_collections.ConfigDict()
  o.learning_rate = 3e-4  # peak learning rate
  o.schedule = 'cosine'  # cosine (warmup + cosine) | wsd (warmup-stable-decay) | constant
  o.warmup_steps = 100  # linear warmup from 0 to the peak
  o.decay_fraction = 0.2  # wsd: final fraction of steps spent decaying to min
  o.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
  o.b1 = 0.9  # AdamW beta1
  o.b2 = 0.95  # AdamW beta2
  o.eps = 1e-8  # AdamW epsilon
  o.weight_decay = 0.1  # decoupled weight decay (not on norms)
  o.decay_embeddings = False  # also decay the embedding (and untied output) matrix
  o.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  o.z_loss = 0.0  # weight of log(Z)^2 auxiliary loss; 0 disables

  c.mesh = h = ml_collections.ConfigDict()
  h.data = -1  # data parallel within a slice/node; -1 fills the rest
  h.fsdp = 1  # fully sharded data parallel within a slice/node
  h.tensor = 1  # tensor parallel within a slice/node
  h.dcn_data = 1  # data parallel across slices/nodes
  h.dcn_fsdp = 1  # fsdp across slices/nodes
  h.dcn_tensor = 1  # tensor parallel across slices/nodes
  # Logical axis -> mesh axes. A logical name maps to a mesh axis or a tuple of them.
  h.logical_rules = (
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('head_dim', None),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('layers', None),
  )

  c.data = d = ml_collections.ConfigDict()
  d.corpus = 'embedded'  # embedded (Django's catalogs, 36 languages) | prepared
  d.prepared_dir = ''  # prepared: the output directory of euro_lm.prepare_data
  d.languages = ''  # comma-separated language tags to use; '' means all available
  d.tokenizer_path = (
      ''  # a SentencePiece .model, HF tokenizer.json or a dir with one; '' trains one
  )
  d.tokenizer_type = 'bpe'  # bpe | unigram, when training a tokenizer
  d.valid_fraction = 0.1  # share of each language's documents held out for validation
  d.seed = 0  # shuffling and mixture-sampling seed
  d.add_bos = True  # start every training document with the tokenizer's BOS
  d.add_eos = True  # end every training document with the tokenizer's EOS
  d.mixture = 'natural'  # natural | temperature | unimax | explicit | groups
  d.mixture_weights = ''  # explicit: 'deu_Latn=2,fra_Latn=1' or staged '0:...;90000:...'
  d.mixture_temperature = 3.0  # temperature: p ~ tokens^(1/T)
  d.unimax_max_epochs = 4.0  # unimax: most passes over any language in train.steps
  d.mixture_groups = ''  # groups: 'eng_Latn=0.3;fra_Latn,spa_Latn=0.2;*=0.5' (natural within)
  d.mixture_min_share = 0.0  # groups: floor for every language's share
  d.chat_files = ''  # fine-tuning: conversation files (JSONL/Parquet globs) and directories
  # of `prepare_data --chat`, comma-separated, optionally named 'clinic=GLOB,faq=DIR'; non-empty
  # replaces the corpus with them (add_bos/add_eos: the template decides)
  d.chat_source_weights = ''  # named chat_files: 'clinic=3,faq=1' or staged '0:...;500:...';
  # '' their token shares (languages within a source: data.mixture)
  d.chat_template = ''  # '' the tokenizer folder's (else the default) | default | a .jinja file
  # The template's other variables for every conversation, a JSON object, as transformers'
  # apply_chat_template(**kwargs): '{"enable_thinking": false}' (Qwen3's switch).
  d.chat_template_kwargs = ''
  d.prompt_loss = False  # also train on the prompt (system/user turns, headers)
  d.chat_messages_field = 'messages'  # the field/column holding each conversation's messages
  d.chat_language_field = ''  # the field with each conversation's language; '' all are 'und'
  d.replay_fraction = 0.0  # fine-tuning: share of tokens replayed from data.corpus (its
  # languages at their natural shares), against forgetting; 0 off
  d.chat_source = ''  # fine-tuning: a JSON file describing where the conversations came from
  # (euro_lm.provenance.FIELDS); '' leaves them undescribed in model cards

  c.distributed = x = ml_collections.ConfigDict()
  x.initialize = 'auto'  # auto (if a cluster env is detected) | always | never
  x.coordinator_address = ''  # host:port of process 0; '' lets JAX detect it
  x.num_processes = 0  # 0 lets JAX detect it
  x.process_id = -1  # -1 lets JAX detect it
  x.initialization_timeout = 300  # seconds for every process to join; then a clear error

  c.hardware = w = ml_collections.ConfigDict()
  w.peak_flops_per_device = 0.0  # for MFU; 0 looks the device up (known GPUs/TPUs), else omitted
  w.keep_freed_host_memory = True  # CPU runs: malloc keeps step temporaries (faster, more RSS)
  return c


def check_variant(arg: str | None, variants: tuple[str, ...], config_file: str) -> str | None:
  """The variant a preset's `get_config(arg)` was asked for (what follows the colon in
  `--config=FILE:arg`), or None; a ConfigError naming the known ones if it has no such."""
  if not arg:
    return None
  if arg not in variants:
    known = f'its variants: {", ".join(variants)}' if variants else 'it has no variants'
    raise ConfigError(f'config {os.path.basename(config_file)} has no variant {arg!r} ({known})')
  return arg


def from_file(spec: str) -> ml_collections.ConfigDict:
  """The config of a preset file, `path.py` or `path.py:variant` as `--config=` takes it."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path
  )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def model_from(config, source: dict) -> ml_collections.ConfigDict:
  """`config` with the model fields of `source` (a run's config as a dict) except
  MODEL_RUN_FIELDS: what `train.model_from_init` does."""
  config = config.copy_and_resolve_references()
  unknown = sorted(set(source) - set(config.model))
  if unknown:
    raise ConfigError(f'train.init_from: its model has fields this euro_lm lacks: {unknown}')
  config.model.update({k: v for k, v in source.items() if k not in MODEL_RUN_FIELDS})
  return config


def _check(ok, message):
  if not ok:
    raise ConfigError(message)


# Real-valued fields and their ranges: (path, low, high, low open, high open); high None is
# unbounded. NaN and infinity are refused everywhere.
_RANGES = (
    ('model.rope_theta', 0, None, True, False),
    ('model.norm_eps', 0, None, True, False),
    ('model.init_std', 0, None, True, False),
    ('optimizer.learning_rate', 0, None, False, False),  # 0: frozen weights, on purpose
    ('optimizer.min_lr_ratio', 0, 1, False, False),
    ('optimizer.b1', 0, 1, False, True),
    ('optimizer.b2', 0, 1, False, True),
    ('optimizer.eps', 0, None, True, False),
    ('optimizer.weight_decay', 0, None, False, False),
    ('optimizer.grad_clip_norm', 0, None, False, False),
    ('optimizer.z_loss', 0, None, False, False),
    ('train.checkpoint_every_minutes', 0, None, False, False),
    ('train.skip_grad_norm_above', 0, None, False, False),
    ('data.valid_fraction', 0, 0.5, True, False),
    ('data.mixture_temperature', 0, None, True, False),
    ('data.unimax_max_epochs', 0, None, True, False),
    ('data.mixture_min_share', 0, 1, False, True),
    ('distributed.initialization_timeout', 0, None, True, False),
    ('hardware.peak_flops_per_device', 0, None, False, False),
)


def _in_range(config, path, low, high, low_open, high_open):
  section, field = path.split('.')
  value = config[section][field]
  if high is None:
    wanted = f'{">" if low_open else ">="} {low}'
  else:
    wanted = f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  ok = (
      math.isfinite(value)
      and (value > low if low_open else value >= low)
      and (high is None or (value < high if high_open else value <= high))
  )
  _check(ok, f'{path}={value} must be {wanted}')


def _one_of(config, path, allowed):
  section, field = path.split('.')
  value = config[section][field]
  _check(value in allowed, f'{path}={value!r} is not one of {", ".join(map(repr, allowed))}')


def _check_lora(config):
  """With `model.lora_rank` > 0: known targets, each once; alpha > 0; a rank no wider than
  the narrowest targeted projection; and nothing asked of the frozen weights."""
  m = config.model
  _check(m.lora_rank >= 0, f'model.lora_rank={m.lora_rank} must be >= 0 (0: no LoRA)')
  if not m.lora_rank:
    return
  names = lora.targets(m)
  unknown = sorted(set(names) - set(lora.TARGETS))
  _check(
      names and not unknown and len(set(names)) == len(names),
      f'model.lora_targets={m.lora_targets!r} must name each projection once, from '
      f'{",".join(lora.TARGETS)}' + (f' (unknown: {", ".join(unknown)})' if unknown else ''),
  )
  _check(
      math.isfinite(m.lora_alpha) and m.lora_alpha > 0,
      f'model.lora_alpha={m.lora_alpha} must be > 0',
  )
  widths = {t: min(lora.widths(m)[t]) for t in names}
  narrowest = min(names, key=widths.get)
  width = widths[narrowest]
  _check(
      m.lora_rank <= width,
      f'model.lora_rank={m.lora_rank} is wider than the {narrowest} projection ({width})',
  )
  _check(
      not config.optimizer.decay_embeddings,
      f'optimizer.decay_embeddings=True has no effect with model.lora_rank={m.lora_rank}: '
      'only the adapters train',
  )


def _check_fp8(m, device):
  """fp8 matmuls only where they are fast: bfloat16 compute, on a GPU with fp8 tensor cores
  (Hopper or newer); the CPU emulates them (tests)."""
  if not m.fp8:
    return
  _check(
      m.compute_dtype == 'bfloat16',
      f'model.fp8=True needs model.compute_dtype=bfloat16, not {m.compute_dtype!r}',
  )
  if device is None or device.platform == 'cpu':
    return
  _check(
      device.fp8_matmuls,
      f'model.fp8=True needs an NVIDIA Hopper or newer GPU (fp8 tensor cores); this run has '
      f'{device.kind or device.platform} ({device.platform}): set model.fp8=False',
  )


def validate(config, num_devices, process_count=1, device=None):
  """Raises ConfigError for a config that cannot run on `num_devices` devices like `device`
  (a `euro_lm.devices.Device`; None skips the platform checks) in `process_count`
  processes. The attention it checks is what `euro_lm.model.attention.resolve` will run.

  Returns the resolved mesh degrees `{'data': .., 'fsdp': .., 'tensor': ..}` (ICI times
  DCN), so callers see what -1 became.
  """
  m, t, o = config.model, config.train, config.optimizer
  platform = device.platform if device else None
  _one_of(config, 'model.compute_dtype', COMPUTE_DTYPES)
  _one_of(config, 'model.remat_policy', tuple(REMAT_POLICIES))
  _one_of(config, 'model.rope_scaling', ROPE_SCALINGS)
  _one_of(config, 'model.mlp_activation', MLP_ACTIVATIONS)
  _one_of(config, 'optimizer.schedule', SCHEDULES)
  _one_of(config, 'data.corpus', CORPORA)
  _one_of(config, 'data.mixture', ('natural', 'temperature', 'unimax', 'explicit', 'groups'))
  _one_of(config, 'distributed.initialize', ('auto', 'always', 'never'))
  _one_of(config, 'train.nonfinite_policy', ('stop', 'skip'))
  _one_of(config, 'train.save_failure', ('stop', 'retry'))
  for path in (
      'model.vocab_size',
      'model.num_layers',
      'model.embed_dim',
      'model.num_heads',
      'model.num_kv_heads',
      'model.mlp_dim',
      'train.steps',
      'train.global_batch_size',
      'train.seq_len',
      'train.grad_accum_steps',
      'train.log_every',
  ):
    section, field = path.split('.')
    _check(config[section][field] > 0, f'{path}={config[section][field]} must be positive')
  _check(
      m.num_heads % m.num_kv_heads == 0,
      f'model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}',
  )
  _check(head_dim(m) % 2 == 0, f'model.head_dim={head_dim(m)} must be even for RoPE')
  if m.rope_scaling != 'none':
    _check(
        m.rope_scaling_factor > 0,
        f'model.rope_scaling_factor={m.rope_scaling_factor} must be positive',
    )
  if m.rope_scaling == 'yarn':
    _check(
        m.rope_yarn_beta_fast > 0 and m.rope_yarn_beta_slow > 0,
        f'model.rope_yarn_beta_fast={m.rope_yarn_beta_fast} and model.rope_yarn_beta_slow='
        f'{m.rope_yarn_beta_slow} must be positive',
    )
    _check(
        m.rope_attention_factor >= 0,
        f'model.rope_attention_factor={m.rope_attention_factor} must be 0 (derived) or positive',
    )
  _check(m.query_scale_beta >= 0, f'model.query_scale_beta={m.query_scale_beta} must be >= 0')
  if m.rope_scaling in ('llama3', 'yarn') or m.query_scale_beta:
    _check(
        m.rope_original_max_positions > 0,
        f'model.rope_original_max_positions={m.rope_original_max_positions} must be positive',
    )
  if m.rope_scaling == 'llama3':
    _check(
        0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
        f'model.rope_low_freq_factor={m.rope_low_freq_factor} must be positive and below '
        f'model.rope_high_freq_factor={m.rope_high_freq_factor}',
    )
  _check(
      m.head_dim or m.embed_dim % m.num_heads == 0,
      f'model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads} '
      '(set model.head_dim explicitly)',
  )
  for path_and_range in _RANGES:
    _in_range(config, *path_and_range)
  _check_lora(config)
  _check_fp8(m, device)
  for path in (
      'model.head_dim',
      'model.sliding_window',
      'model.sliding_window_pattern',
      'model.rope_local_theta',
      'model.nope_interval',
      'model.query_pre_attn_scalar',
      'model.attn_logit_softcap',
      'model.final_logit_softcap',
      'model.loss_chunk_length',
      'optimizer.warmup_steps',
      'train.eval_every',
      'train.eval_batches',
      'train.checkpoint_every',
      'train.keep_checkpoints_every',
      'train.profile_start_step',
      'train.harness_every',
      'train.harness_limit',
      'distributed.num_processes',
  ):
    section, field = path.split('.')
    _check(config[section][field] >= 0, f'{path}={config[section][field]} must be >= 0')
  _check(
      config.distributed.process_id >= -1,
      f'distributed.process_id={config.distributed.process_id} must be >= 0 (or -1: detect)',
  )
  _check(
      m.nope_interval <= m.num_layers,
      f'model.nope_interval={m.nope_interval} is more than model.num_layers={m.num_layers}: '
      'no layer would be without RoPE',
  )
  _check(
      not m.rope_local_theta or m.sliding_window_pattern,
      f'model.rope_local_theta={m.rope_local_theta} needs model.sliding_window_pattern > 0 '
      '(which layers are local)',
  )
  _check(
      not t.model_from_init or t.init_from,
      'train.model_from_init=True needs train.init_from (the checkpoint whose model to tune)',
  )
  for field in (
      'chat_template',
      'chat_template_kwargs',
      'chat_language_field',
      'prompt_loss',
      'chat_source',
  ):
    _check(
        not config.data[field] or config.data.chat_files,
        f'data.{field}={config.data[field]!r} needs data.chat_files (the conversations)',
    )
  r = config.data.replay_fraction
  _check(math.isfinite(r) and 0 <= r < 1, f'data.replay_fraction={r} must be in [0, 1)')
  _check(
      not r or config.data.chat_files,
      f'data.replay_fraction={r} needs data.chat_files (replay is for fine-tuning)',
  )
  _check(
      not config.data.chat_files or config.data.chat_messages_field,
      'data.chat_messages_field must name the field holding the messages',
  )
  chat.template_variables(config.data.chat_template_kwargs, 'data.chat_template_kwargs')
  sources = {}
  if config.data.chat_files:
    sources = mixture.parse_sources(config.data.chat_files, field='data.chat_files')
  if config.data.chat_source_weights:
    _check(
        sources and '' not in sources,
        f'data.chat_source_weights={config.data.chat_source_weights!r} needs named sources in'
        " data.chat_files ('clinic=GLOB_OR_DIR,faq=...')",
    )
    mixture.source_schedule(
        config.data.chat_source_weights, sources, field='data.chat_source_weights'
    )
  _check(t.keep_checkpoints >= 1, f'train.keep_checkpoints={t.keep_checkpoints} must be >= 1')
  _check(t.profile_steps >= 1, f'train.profile_steps={t.profile_steps} must be >= 1')
  if t.harness_tasks:
    _check(
        importlib.util.find_spec('lm_eval') is not None,
        f"train.harness_tasks={t.harness_tasks!r} needs lm-eval: pip install 'euro_lm[eval]'",
    )
  _check(
      not t.harness_include_path or os.path.isdir(t.harness_include_path),
      f'train.harness_include_path={t.harness_include_path!r} is not a directory',
  )
  _check(
      t.max_skipped_in_a_row >= 1,
      f'train.max_skipped_in_a_row={t.max_skipped_in_a_row} must be >= 1',
  )
  _check(
      not t.skip_grad_norm_above or t.nonfinite_policy == 'skip',
      f"train.skip_grad_norm_above={t.skip_grad_norm_above} needs train.nonfinite_policy='skip'",
  )
  try:
    resolve_for_model(m, t.seq_len, device)
  except AttentionError as e:
    raise ConfigError(str(e)) from None
  _check(
      0 < o.decay_fraction <= 1, f'optimizer.decay_fraction={o.decay_fraction} must be in (0, 1]'
  )

  try:
    ici, dcn = mesh_shape(config.mesh, num_devices)
  except MeshError as e:
    raise ConfigError(str(e)) from None
  degrees = {axis: i * d for axis, i, d in zip(MESH_AXES, ici, dcn)}

  tensor = degrees['tensor']
  for path in ('model.num_heads', 'model.num_kv_heads', 'model.mlp_dim', 'model.vocab_size'):
    value = m[path.split('.')[1]]
    _check(
        value % tensor == 0,
        f'{path}={value} is not divisible by the tensor-parallel degree {tensor} '
        f'(mesh.tensor={config.mesh.tensor} x mesh.dcn_tensor={config.mesh.dcn_tensor})',
    )
  _check(
      m.embed_dim % degrees['fsdp'] == 0,
      f'model.embed_dim={m.embed_dim} is not divisible by the fsdp degree {degrees["fsdp"]}',
  )
  batch_axes = batch_mesh_axes(logical_rules(config.mesh))
  batch_ways = math.prod(degrees[a] for a in batch_axes)
  describe_batch_ways = ' x '.join(f'{a}={degrees[a]}' for a in batch_axes) or 'unsplit'
  micro_batch, remainder = divmod(t.global_batch_size, t.grad_accum_steps)
  _check(
      remainder == 0,
      f'train.global_batch_size={t.global_batch_size} is not divisible by '
      f'train.grad_accum_steps={t.grad_accum_steps}',
  )
  _check(
      micro_batch % batch_ways == 0,
      f'train.global_batch_size={t.global_batch_size} / train.grad_accum_steps='
      f'{t.grad_accum_steps} = {micro_batch} is not divisible by the data-parallel size '
      f'{batch_ways} ({describe_batch_ways})',
  )
  # Each process loads its own rows, so processes must not share a batch shard.
  _check(
      batch_ways % process_count == 0,
      f'the batch is split {batch_ways} ways ({describe_batch_ways}), which does not give '
      f'each of the {process_count} processes its own rows; raise mesh.data/mesh.fsdp '
      '(or their dcn_ degrees) instead of tensor parallelism across processes',
  )
  dcn_size = math.prod(dcn)
  _check(
      platform in (None, 'tpu') or dcn_size in (1, process_count),
      f'mesh.dcn_* multiply to {dcn_size} but there are {process_count} processes; on GPUs '
      'each process (node) is one DCN granule',
  )
  return degrees
