"""Hugging Face Llama export and import: names, shapes and configs, both directions.

euro_lm's decoder is HF `LlamaForCausalLM` up to names, reshapes and transposes (never a
permutation): RoPE is rotate-half in both. Layer weights are stacked `[num_layers, ...]` by
`nn.scan` here and split into `model.layers.{i}.*` there. torch Linear weights are
`[out, in]`; ours are `[in, ...]` einsum params, hence the transposes.

Export streams: each tensor is read from the Orbax checkpoint alone (through TensorStore;
one layer at a time, as euro_lm stores stacked leaves in per-layer chunks), converted, and
written straight into its planned place in a safetensors shard, so host memory stays near
one tensor. It needs neither torch nor transformers
(transformers, if importable, adds the fast tokenizer's tokenizer.json).

Import accepts local safetensors folders of model_type llama, mistral (no sliding window)
and qwen2 (only without biases, which real Qwen2 checkpoints have: they are refused).
"""

import json
import math
import os
import shutil

import ml_dtypes
import numpy as np

from euro_lm.errors import UserError

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
INDEX_FILE = 'model.safetensors.index.json'
DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}
SAFETENSORS_DTYPES = {'F32': np.float32, 'BF16': ml_dtypes.bfloat16, 'F16': np.float16,
                      'F64': np.float64}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                 'qwen2': 'Qwen2ForCausalLM'}


class HFError(UserError, ValueError):
  """A Hugging Face folder or config that euro_lm cannot read or write; names the field."""


# (euro_lm param path, HF name, per layer). Per-layer HF names take the layer index `i`.
_PARAMS = (
    (('embedding',), 'model.embed_tokens.weight', False),
    (('layers', 'attention', 'wq'), 'model.layers.{i}.self_attn.q_proj.weight', True),
    (('layers', 'attention', 'wk'), 'model.layers.{i}.self_attn.k_proj.weight', True),
    (('layers', 'attention', 'wv'), 'model.layers.{i}.self_attn.v_proj.weight', True),
    (('layers', 'attention', 'wo'), 'model.layers.{i}.self_attn.o_proj.weight', True),
    (('layers', 'mlp', 'w_gate'), 'model.layers.{i}.mlp.gate_proj.weight', True),
    (('layers', 'mlp', 'w_up'), 'model.layers.{i}.mlp.up_proj.weight', True),
    (('layers', 'mlp', 'w_down'), 'model.layers.{i}.mlp.down_proj.weight', True),
    (('layers', 'attention_norm', 'scale'), 'model.layers.{i}.input_layernorm.weight', True),
    (('layers', 'mlp_norm', 'scale'), 'model.layers.{i}.post_attention_layernorm.weight', True),
    (('final_norm', 'scale'), 'model.norm.weight', False),
    (('output',), 'lm_head.weight', False),
)


def param_table(model):
  """[(euro_lm path, HF name template, per layer)] for the `model` config section."""
  return [p for p in _PARAMS if p[0] != ('output',) or not model['tie_embeddings']]


def _head_dim(model):
  return model['head_dim'] or model['embed_dim'] // model['num_heads']


def to_hf(path, x, model):
  """One euro_lm param (one layer's slice if stacked) as the HF tensor: a torch Linear
  weight `[out, in]`, an embedding `[V, D]` or a norm scale `[D]`."""
  name = path[-1]
  if name in ('wq', 'wk', 'wv'):  # [D, heads, hd] -> [heads * hd, D]
    return x.reshape(x.shape[0], -1).T
  if name == 'wo':  # [H, hd, D] -> [D, H * hd]
    return x.reshape(-1, x.shape[-1]).T
  if name in ('w_gate', 'w_up', 'w_down', 'output'):
    return x.T
  return x


def from_hf(path, x, model):
  """The inverse of `to_hf`: one HF tensor as the euro_lm param (one layer's slice)."""
  name, hd = path[-1], _head_dim(model)
  if name in ('wq', 'wk', 'wv'):  # [heads * hd, D] -> [D, heads, hd]
    return x.T.reshape(x.shape[1], -1, hd)
  if name == 'wo':  # [D, H * hd] -> [H, hd, D]
    return x.T.reshape(-1, hd, x.shape[0])
  if name in ('w_gate', 'w_up', 'w_down', 'output'):
    return x.T
  return x


def expected_hf_shapes(model):
  """{HF name: shape} of every tensor of `model` (a `model` config section, as a dict), in
  `param_table` order, layer by layer."""
  d, f, v = model['embed_dim'], model['mlp_dim'], model['vocab_size']
  h, k, hd = model['num_heads'], model['num_kv_heads'], _head_dim(model)
  shapes = {'embedding': (v, d), 'wq': (h * hd, d), 'wk': (k * hd, d), 'wv': (k * hd, d),
            'wo': (d, h * hd), 'w_gate': (f, d), 'w_up': (f, d), 'w_down': (d, f),
            'scale': (d,), 'output': (v, d)}
  out = {}
  for path, template, per_layer in param_table(model):
    for i in range(model['num_layers'] if per_layer else 1):
      out[template.format(i=i)] = shapes[path[-1]]
  return out


# ----------------------------------------------------------------------------- configs


def hf_config(model, *, bos_token_id, eos_token_id, pad_token_id=None,
              max_position_embeddings=4096, dtype='bfloat16'):
  """HF LlamaConfig fields (config.json) for euro_lm's `model` section."""
  if model['qk_norm']:
    raise HFError('model.qk_norm=True has no LlamaForCausalLM equivalent (Llama has no '
                  'q_norm/k_norm); export supports qk_norm=False only')
  theta = float(model['rope_theta'])
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': model['vocab_size'],
      'hidden_size': model['embed_dim'],
      'intermediate_size': model['mlp_dim'],
      'num_hidden_layers': model['num_layers'],
      'num_attention_heads': model['num_heads'],
      'num_key_value_heads': model['num_kv_heads'],
      'head_dim': _head_dim(model),
      'hidden_act': 'silu',
      'rms_norm_eps': float(model['norm_eps']),
      # transformers >= 5 reads rope_parameters; older versions read rope_theta.
      'rope_theta': theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': theta},
      'rope_scaling': None,
      'max_position_embeddings': int(max_position_embeddings),
      'tie_word_embeddings': bool(model['tie_embeddings']),
      'attention_bias': False,
      'mlp_bias': False,
      'attention_dropout': 0.0,
      'initializer_range': float(model['init_std']),
      'bos_token_id': bos_token_id,
      'eos_token_id': eos_token_id,
      'pad_token_id': pad_token_id,
      'use_cache': True,
      'torch_dtype': dtype,  # transformers < 5
      'dtype': dtype,
  }


def _rope_theta(hf, where):
  params = hf.get('rope_parameters')
  scaling = hf.get('rope_scaling')
  if scaling not in (None, {}) and not (isinstance(scaling, dict)
                                        and scaling.get('rope_type', scaling.get('type'))
                                        == 'default'):
    raise HFError(f'{where}: rope_scaling={scaling!r} is not supported (euro_lm has plain '
                  'RoPE only); rope_scaling must be null')
  if params is not None:
    # transformers 5 may nest per-layer-type parameters; only the plain form is ours.
    rope_type = params.get('rope_type', params.get('type', 'default'))
    if rope_type != 'default':
      raise HFError(f'{where}: rope_parameters.rope_type={rope_type!r} is not supported '
                    '(euro_lm has plain RoPE only); it must be "default"')
    if 'rope_theta' in params:
      return float(params['rope_theta'])
  if 'rope_theta' in hf:
    return float(hf['rope_theta'])
  return 10_000.0  # LlamaConfig's default


def model_config_from_hf(hf, where='config.json'):
  """euro_lm `model` fields from an HF config dict; refuses what euro_lm cannot represent,
  naming the HF field."""
  model_type = hf.get('model_type')
  if model_type not in ARCHITECTURES:
    raise HFError(f'{where}: model_type={model_type!r} is not supported; euro_lm imports '
                  f'{", ".join(sorted(ARCHITECTURES))}')
  for arch in hf.get('architectures') or []:
    if arch not in ARCHITECTURES.values():
      raise HFError(f'{where}: architectures={hf["architectures"]!r} is not supported; '
                    f'euro_lm imports {", ".join(sorted(ARCHITECTURES.values()))}')
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise HFError(f'{where}: hidden_act={act!r} is not supported; euro_lm uses SwiGLU (silu)')
  for field in ('attention_bias', 'mlp_bias'):
    if hf.get(field):
      raise HFError(f'{where}: {field}=true is not supported; euro_lm layers have no biases')
  if model_type == 'mistral' and hf.get('sliding_window') is not None:
    raise HFError(f'{where}: sliding_window={hf["sliding_window"]!r} is not supported; '
                  'euro_lm attends to the full causal context (sliding_window must be null)')
  if model_type == 'qwen2' and hf.get('use_sliding_window'):
    raise HFError(f'{where}: use_sliding_window=true is not supported; euro_lm attends to '
                  'the full causal context')
  try:
    d, h = int(hf['hidden_size']), int(hf['num_attention_heads'])
    model = {
        'vocab_size': int(hf['vocab_size']),
        'num_layers': int(hf['num_hidden_layers']),
        'embed_dim': d,
        'num_heads': h,
        'num_kv_heads': int(hf.get('num_key_value_heads') or h),
        'head_dim': int(hf.get('head_dim') or d // h),
        'mlp_dim': int(hf['intermediate_size']),
        'rope_theta': _rope_theta(hf, where),
        'norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
        'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
        'qk_norm': False,
    }
  except KeyError as e:
    raise HFError(f'{where}: required field {e.args[0]} is missing') from None
  if model['num_heads'] % model['num_kv_heads']:
    raise HFError(f'{where}: num_attention_heads={h} is not a multiple of '
                  f'num_key_value_heads={model["num_kv_heads"]}')
  return model


# ---------------------------------------------------------------------- safetensors io


def _read_header(path):
  with open(path, 'rb') as f:
    size = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(size))
  header.pop('__metadata__', None)
  return header, 8 + size


class SafetensorsFolder:
  """Reads tensors by name from a folder of .safetensors files, memory-mapped, one at a
  time (bfloat16 through ml_dtypes, so neither torch nor safetensors' numpy API)."""

  def __init__(self, directory):
    self.directory = directory
    files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
    if not files:
      pickled = sorted(f for f in os.listdir(directory)
                       if f.endswith(('.bin', '.pt', '.pth', '.ckpt', '.pkl')))
      detail = (f' (it has {", ".join(pickled)}: pickled PyTorch weights, which euro_lm does '
                'not load because unpickling runs arbitrary code; convert them to '
                'safetensors first, e.g. save_pretrained(..., safe_serialization=True))'
                if pickled else '')
      raise HFError(f'no *.safetensors weights in {directory}{detail}')
    self._where = {}
    for name in files:
      path = os.path.join(directory, name)
      try:
        header, offset = _read_header(path)
      except (OSError, ValueError) as e:
        raise HFError(f'{path} is not a safetensors file: {e}') from None
      for key, info in header.items():
        self._where[key] = (path, offset, info)

  def names(self):
    return sorted(self._where)

  def get(self, name):
    if name not in self._where:
      raise HFError(f'tensor {name} is missing from {self.directory}')
    path, offset, info = self._where[name]
    if info['dtype'] not in SAFETENSORS_DTYPES:
      raise HFError(f'{path}: tensor {name} has dtype {info["dtype"]}; euro_lm reads '
                    f'{", ".join(SAFETENSORS_DTYPES)}')
    start, end = info['data_offsets']
    dtype = np.dtype(SAFETENSORS_DTYPES[info['dtype']])
    data = np.memmap(path, dtype=np.uint8, mode='r', offset=offset + start,
                     shape=(end - start,))
    return data.view(dtype).reshape(info['shape'])


class ShardWriter:
  """Writes `model-XXXXX-of-YYYYY.safetensors` shards one tensor at a time.

  Every tensor's name, shape and dtype is known before any is computed (`layout`, in
  writing order), so each shard's header is written first and a tensor goes to disk as
  soon as it is made: memory holds one tensor, not one shard. A shard holds at most about
  `max_bytes` (a larger tensor gets one of its own). Shards are written under temporary
  names and renamed by close(), so a failed export leaves no loadable half-model.
  """

  def __init__(self, directory, layout, max_bytes):
    self.directory = directory
    self._shards, size = [], 0  # [[(name, shape, dtype)]]
    for name, shape, dtype in layout:
      nbytes = math.prod(shape) * np.dtype(dtype).itemsize
      if not self._shards or (size and size + nbytes > max_bytes):
        self._shards.append([])
        size = 0
      self._shards[-1].append((name, tuple(shape), np.dtype(dtype)))
      size += nbytes
    self._pending = [(k, entry) for k, shard in enumerate(self._shards) for entry in shard]
    self._next, self._file, self._total = 0, None, 0

  def _part(self, k):
    return os.path.join(self.directory, f'.part-{k:05d}.safetensors')

  def _open(self, k):
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, shape, dtype in self._shards[k]:
      nbytes = math.prod(shape) * dtype.itemsize
      header[name] = {'dtype': _SAFETENSORS_NAMES[dtype], 'shape': list(shape),
                      'data_offsets': [offset, offset + nbytes]}
      offset += nbytes
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    self._file = open(self._part(k), 'wb')  # pylint: disable=consider-using-with
    self._file.write(len(text).to_bytes(8, 'little') + text)

  def add(self, name, array):
    if self._next == len(self._pending):
      raise ValueError(f'ShardWriter: {name} is not in the planned layout')
    k, (expected, shape, dtype) = self._pending[self._next]
    if (name, tuple(array.shape), array.dtype) != (expected, shape, dtype):
      raise ValueError(f'ShardWriter: got {name} {array.shape} {array.dtype}, expected '
                       f'{expected} {shape} {dtype}')
    if self._file is None:
      self._open(k)
    self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    self._total += array.nbytes
    self._next += 1
    if self._next == len(self._pending) or self._pending[self._next][0] != k:
      self._file.close()
      self._file = None

  def close(self):
    """Renames the finished shards and writes the index; returns the number of shards."""
    if self._next != len(self._pending):
      raise ValueError(f'ShardWriter: {self._pending[self._next][1][0]} was never written')
    n, weight_map = len(self._shards), {}
    umask = os.umask(0)
    os.umask(umask)
    for k, shard in enumerate(self._shards):
      name = f'model-{k + 1:05d}-of-{n:05d}.safetensors'
      os.replace(self._part(k), os.path.join(self.directory, name))
      os.chmod(os.path.join(self.directory, name), 0o666 & ~umask)  # not 0600 like a tmp file
      weight_map.update({entry[0]: name for entry in shard})
    index = {'metadata': {'total_size': self._total}, 'weight_map': dict(sorted(
        weight_map.items()))}
    with open(os.path.join(self.directory, INDEX_FILE), 'w', encoding='utf-8') as f:
      json.dump(index, f, indent=2)
    return n

  def abort(self):
    """Removes the temporary shards of an export that failed."""
    if self._file is not None:
      self._file.close()
    for k in range(len(self._shards)):
      if os.path.exists(self._part(k)):
        os.remove(self._part(k))


# ------------------------------------------------------------------- orbax leaf reader


class CheckpointLeaves:
  """Reads single leaves of an Orbax `state` item through TensorStore, so no more than one
  leaf is in memory."""

  def __init__(self, state_dir):
    self.state_dir = os.path.abspath(str(state_dir))

  def _open(self, name):
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    kvstores = [{'driver': 'ocdbt', 'base': 'file://' + self.state_dir, 'path': name},
                {'driver': 'file', 'path': os.path.join(self.state_dir, name)}]
    errors = []
    for kvstore in kvstores:
      for driver in ('zarr', 'zarr3'):
        try:
          return ts.open({'driver': driver, 'kvstore': kvstore}, open=True).result()
        except Exception as e:  # pylint: disable=broad-except
          errors.append(f'{driver}/{kvstore["driver"]}: {e}')
    raise HFError(f'cannot read {name} from checkpoint {self.state_dir}: {errors[0]}')

  def read(self, path):
    return np.asarray(self._open('.'.join(('params',) + tuple(path))).read().result())

  def read_layers(self, path):
    """Yields `(i, leaf[i])` for a leaf stacked over layers, decompressing one stored chunk
    of layers at a time: a single layer from checkpoints written with per-layer chunks
    (euro_lm's own), the whole leaf from others."""
    store = self._open('.'.join(('params',) + tuple(path)))
    num_layers = store.shape[0]
    chunk = store.chunk_layout.read_chunk.shape
    step = chunk[0] if chunk and chunk[0] else num_layers
    for start in range(0, num_layers, step):
      block = np.asarray(store[start:start + step].read().result())
      for i, layer in enumerate(block):
        yield start + i, layer


# ----------------------------------------------------------------------------- export


def _load_run_config(step_dir, workdir):
  candidates = [os.path.join(str(step_dir), 'config', 'metadata'),
                os.path.join(workdir, CONFIG_FILE)]
  for path in candidates:
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        config = json.load(f)
      if 'model' not in config:
        raise HFError(f'{path} has no "model" section')
      return config, path
  raise HFError(f'no euro_lm config for {step_dir}: looked for {" and ".join(candidates)}')


def export_hf(workdir, output, *, step=None, dtype='bfloat16', shard_bytes=2 * 2**30,
              max_position_embeddings=None, log=print):
  """Writes the checkpoint of `workdir` (newest, or `step`) as an HF Llama folder.

  Returns the output directory.
  """
  if dtype not in DTYPES:
    raise HFError(f'--dtype={dtype!r} is not supported; use one of {", ".join(DTYPES)}')
  from euro_lm.checkpoint import find_tokenizer, resolve_checkpoint
  step_dir = resolve_checkpoint(workdir, step)
  config, config_path = _load_run_config(step_dir, workdir)
  model = config['model']
  tokenizer_path = find_tokenizer(step_dir, workdir)
  bos, eos, pad = 2, 3, 0  # euro_lm.data.tokenizer.train_sentencepiece's ids
  if tokenizer_path:
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    bos, eos, pad = sp.bos_id(), sp.eos_id(), (sp.pad_id() if sp.pad_id() >= 0 else None)
  seq_len = (config.get('train') or {}).get('seq_len', 4096)
  hf = hf_config(model, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                 max_position_embeddings=max_position_embeddings or seq_len, dtype=dtype)

  os.makedirs(output, exist_ok=True)
  stale = sorted(f for f in os.listdir(output) if f.endswith('.safetensors'))
  if stale:  # transformers would load old shards beside the new index
    raise HFError(f'--output={output} already holds {stale[0]}; export into a new directory')
  shapes = expected_hf_shapes(model)  # in writing order
  writer = ShardWriter(output, [(n, s, DTYPES[dtype]) for n, s in shapes.items()], shard_bytes)
  leaves = CheckpointLeaves(os.path.join(str(step_dir), 'state'))
  try:
    for path, template, per_layer in param_table(model):
      for i, x in leaves.read_layers(path) if per_layer else [(None, leaves.read(path))]:
        name = template.format(i=i)
        x = to_hf(path, x, model)
        if x.shape != shapes[name]:
          raise HFError(f'{step_dir}: params.{".".join(path)} gives {name} of shape '
                        f'{x.shape}, but {config_path} implies {shapes[name]}')
        writer.add(name, x.astype(DTYPES[dtype]))
    num_shards = writer.close()
  except BaseException:
    writer.abort()
    raise

  _write_json(os.path.join(output, CONFIG_FILE), hf)
  _write_json(os.path.join(output, 'generation_config.json'),
              {'bos_token_id': bos, 'eos_token_id': eos, 'pad_token_id': pad,
               'do_sample': False})
  if tokenizer_path:
    write_tokenizer(tokenizer_path, output, log=log)
  else:
    log(f'warning: no {TOKENIZER_FILE} in {step_dir} or {workdir}; exported no tokenizer')
  log(f'exported {step_dir} to {output}: {num_shards} shard(s), {dtype}')
  return output


def _write_json(path, obj):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write('\n')


def write_tokenizer(model_path, output, log=print):
  """tokenizer.model, tokenizer_config.json and special_tokens_map.json, plus the fast
  tokenizer.json when transformers is importable (converted offline from the .model)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  shutil.copyfile(model_path, os.path.join(output, TOKENIZER_FILE))
  sp = spm.SentencePieceProcessor(model_file=model_path)
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, 'rb') as f:
    proto.ParseFromString(f.read())
  piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
  special = {'bos_token': piece(sp.bos_id()), 'eos_token': piece(sp.eos_id()),
             'unk_token': piece(sp.unk_id()), 'pad_token': piece(sp.pad_id())}
  special = {k: v for k, v in special.items() if v is not None}
  # euro_lm's tokenizers add no dummy prefix ('▁' before the text); HF must not either.
  add_prefix_space = bool(proto.normalizer_spec.add_dummy_prefix)
  tokenizer_config = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': True,
                      'add_eos_token': False, 'legacy': False,
                      'add_prefix_space': add_prefix_space,
                      'clean_up_tokenization_spaces': False,
                      'model_max_length': 1_000_000_000, **special}
  _write_json(os.path.join(output, 'tokenizer_config.json'), tokenizer_config)
  try:
    from transformers import LlamaTokenizer  # pylint: disable=import-outside-toplevel
  except ImportError:
    log('transformers is not installed: wrote tokenizer.model without tokenizer.json')
  else:
    tokenizer = LlamaTokenizer.from_pretrained(output)
    tokenizer.save_pretrained(output)
    # save_pretrained rewrites tokenizer_config.json; keep ours, which names the fields.
    _write_json(os.path.join(output, 'tokenizer_config.json'), tokenizer_config)
  _write_json(os.path.join(output, 'special_tokens_map.json'), special)


# ----------------------------------------------------------------------------- import


def params_from_hf(folder, model):
  """Yields `(euro_lm path, float32 numpy leaf)` one leaf at a time (layers stacked) from a
  SafetensorsFolder, after checking every name, and each shape against `model`."""
  shapes = expected_hf_shapes(model)
  names = set(folder.names())
  biases = sorted(n for n in names if n.endswith('.bias'))
  if biases:
    raise HFError(f'{folder.directory} has bias tensors ({biases[0]}, ...); euro_lm layers '
                  'have no biases (Qwen2 checkpoints, for instance, cannot be imported)')
  if model['tie_embeddings']:
    names.discard('lm_head.weight')  # some tied checkpoints still store the copy
  unknown = sorted(names - set(shapes) - {n for n in names if 'rotary_emb' in n})
  if unknown:
    raise HFError(f'{folder.directory}: tensors euro_lm has no place for: '
                  f'{", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""}')

  def read(name, path):
    x = folder.get(name)
    if tuple(x.shape) != shapes[name]:
      raise HFError(f'{folder.directory}: {name} has shape {tuple(x.shape)}, but '
                    f'{CONFIG_FILE} implies {shapes[name]}')
    return from_hf(path, np.asarray(x, np.float32), model)

  for path, template, per_layer in param_table(model):
    if not per_layer:
      yield path, read(template.format(i=None), path)
      continue
    first = read(template.format(i=0), path)
    leaf = np.empty((model['num_layers'],) + first.shape, np.float32)  # filled, not stacked:
    leaf[0] = first                                                    # one copy in memory
    for i in range(1, model['num_layers']):
      leaf[i] = read(template.format(i=i), path)
    yield path, leaf
    del leaf, first  # before the next leaf is allocated


def _nested(path, value):
  for key in reversed(path):
    value = {key: value}
  return value


def import_hf(hf_dir, workdir, log=print):
  """Writes `workdir/checkpoints/0/state` (a params-only Orbax checkpoint that
  `--config.train.init_from=workdir` reads), `workdir/config.json`,
  `workdir/hf_config.py` and, if present, `workdir/tokenizer.model`.

  The checkpoint is written one leaf at a time (Orbax partial saves, committed at the end),
  so host memory holds one leaf, not the model. Returns the euro_lm config (a ConfigDict).
  """
  from orbax.checkpoint import v1 as ocp  # pylint: disable=import-outside-toplevel
  from euro_lm.config import base_config  # pylint: disable=import-outside-toplevel
  from euro_lm.checkpoint import layer_chunk_axes  # pylint: disable=import-outside-toplevel

  config_path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise HFError(f'no {CONFIG_FILE} in {hf_dir}')
  with open(config_path, encoding='utf-8') as f:
    hf = json.load(f)
  model = model_config_from_hf(hf, config_path)
  folder = SafetensorsFolder(hf_dir)

  workdir = os.path.abspath(workdir)
  step_dir = os.path.join(workdir, 'checkpoints', '0')
  if os.path.exists(step_dir):
    raise HFError(f'{step_dir} already exists; import into an empty workdir')
  os.makedirs(os.path.dirname(step_dir), exist_ok=True)
  saving = ocp.options.ArrayOptions.Saving
  context = ocp.Context(
      array_options=ocp.options.ArrayOptions(saving=saving(
          # One file per chunk, written as it is encoded: OCDBT would buffer a whole
          # leaf's encoded chunks in memory until its commit (0.5x instead of 0.7x the
          # model's size for the 1B preset).
          use_ocdbt=False, use_zarr3=False,
          scoped_storage_options_creator=lambda key, value: saving.StorageOptions(
              shard_axes=layer_chunk_axes(key, value)))),
      # Each save below finishes before its leaf is dropped: no need for Orbax's copy.
      memory_options=ocp.options.MemoryOptions(deepcopy_host_arrays=False))
  with context:
    for path, leaf in params_from_hf(folder, model):
      ocp.partial.save(step_dir, {'params': _nested(path, leaf)})
      del leaf
    ocp.partial.finalize(step_dir)
  state_dir = os.path.join(step_dir, 'state')

  config = base_config()
  config.model.update(model)
  config.train.init_from = workdir
  tokenizer_src = os.path.join(hf_dir, TOKENIZER_FILE)
  if os.path.isfile(tokenizer_src):
    shutil.copyfile(tokenizer_src, os.path.join(workdir, TOKENIZER_FILE))
    config.data.tokenizer_path = os.path.join(workdir, TOKENIZER_FILE)
  else:
    log(f'warning: no {TOKENIZER_FILE} in {hf_dir}: set data.tokenizer_path to a '
        'SentencePiece model with the same ids before training')
  _write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())
  overrides = training_overrides(config)
  with open(os.path.join(workdir, 'hf_config.py'), 'w', encoding='utf-8') as f:
    f.write(f'"""euro_lm config for the HF model imported from {hf_dir}."""\n\n'
            'from euro_lm.config import base_config\n\n\ndef get_config(arg=None):\n'
            '  del arg\n  c = base_config()\n')
    for key, value in overrides.items():
      f.write(f'  c.{key} = {value!r}\n')
    f.write('  return c\n')
  log(f'imported {hf_dir} into {state_dir}; continue training with\n  python -m euro_lm.train '
      f'--config={os.path.join(workdir, "hf_config.py")} --workdir=NEW_WORKDIR\nor\n'
      '  python -m euro_lm.train --config=configs/base.py --workdir=NEW_WORKDIR '
      + ' '.join(f'--config.{k}={v}' for k, v in overrides.items()))
  return config


def training_overrides(config):
  """{'model.x': value} for every imported field, plus init_from and the tokenizer."""
  out = {f'model.{k}': config.model[k] for k in
         ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim',
          'mlp_dim', 'rope_theta', 'norm_eps', 'tie_embeddings', 'qk_norm')}
  out['train.init_from'] = config.train.init_from
  if config.data.tokenizer_path:
    out['data.tokenizer_path'] = config.data.tokenizer_path
  return out
