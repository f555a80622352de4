"""Every euro_lm config field, with its default. Presets override these, never add.

Use: `python -m euro_lm.train --config=configs/tiny.py --config.train.steps=100`.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 32_000            # tokenizer and embedding size
  m.num_layers = 12                # decoder blocks
  m.embed_dim = 768                # model width D
  m.num_heads = 12                 # query heads H
  m.num_kv_heads = 12              # key/value heads K (grouped-query attention); divides H
  m.head_dim = 64                  # per-head width; 0 means embed_dim // num_heads
  m.mlp_dim = 2048                 # SwiGLU hidden width F
  m.rope_theta = 10_000.0          # RoPE base frequency
  m.norm_eps = 1e-5                # RMSNorm epsilon
  m.tie_embeddings = True          # share input embedding and output projection
  m.qk_norm = False                # RMSNorm on queries and keys per head
  m.init_std = 0.02                # normal init std for weights
  m.compute_dtype = 'float32'      # activations/matmuls: float32 | bfloat16 | float16
  m.attention_impl = 'xla'         # xla (reference) | cudnn | pallas (euro_lm.kernels) | auto
  m.pallas_backend = 'auto'        # pallas kernels: auto (by device) | gpu (Triton) |
                                   # mosaic_gpu (Hopper) | tpu
  m.remat_policy = 'none'          # none | full | dots | dots_no_batch | save_attention_out
  m.loss_chunk_length = 0          # >0: output projection + loss fused, this many positions
                                   # at a time (no [B, L, V] logits); 0: all logits at once

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000                   # optimizer steps
  t.global_batch_size = 64         # sequences per optimizer step, over all devices
  t.seq_len = 1024                 # tokens per sequence
  t.grad_accum_steps = 1           # micro-batches per step (each global_batch_size / this)
  t.seed = 0                       # parameter init and dropout-free step RNG
  t.log_every = 10                 # steps between metric records
  t.eval_every = 200               # steps between validation passes; 0 disables
  t.eval_batches = 4               # batches per language per validation pass
  t.checkpoint_every = 500         # steps between checkpoints; 0 disables (final always saved)
  t.checkpoint_every_minutes = 0.0  # also save once this many minutes passed since the last; 0 off
  t.keep_checkpoints = 3           # newest checkpoints kept on disk
  t.keep_checkpoints_every = 0     # also keep every step that is a multiple of this; 0 off
  t.init_from = ''                 # new run: parameters from this checkpoint (workdir or step dir)
  t.nonfinite_policy = 'stop'      # non-finite loss/gradient: stop | skip (the update)
  t.max_skipped_in_a_row = 10      # skip: stop after more consecutive skipped updates than this
  t.skip_grad_norm_above = 0.0     # skip: also skip updates whose gradient norm exceeds this; 0 off
  t.profile_start_step = 0         # >0: trace steps [this, this + profile_steps) with the JAX
                                   # profiler into workdir/tensorboard; 0 off
  t.profile_steps = 3              # steps in that trace

  c.optimizer = o = ml_collections.ConfigDict()
  o.learning_rate = 3e-4           # peak learning rate
  o.schedule = 'cosine'            # cosine (warmup + cosine) | wsd (warmup-stable-decay) | constant
  o.warmup_steps = 100             # linear warmup from 0 to the peak
  o.decay_fraction = 0.2           # wsd: final fraction of steps spent decaying to min
  o.min_lr_ratio = 0.1             # final learning rate as a fraction of the peak
  o.b1 = 0.9                       # AdamW beta1
  o.b2 = 0.95                      # AdamW beta2
  o.eps = 1e-8                     # AdamW epsilon
  o.weight_decay = 0.1             # decoupled weight decay (not on norms)
  o.decay_embeddings = False       # also decay the embedding (and untied output) matrix
  o.grad_clip_norm = 1.0           # global-norm clipping; 0 disables
  o.z_loss = 0.0                   # weight of log(Z)^2 auxiliary loss; 0 disables

  c.mesh = h = ml_collections.ConfigDict()
  h.data = -1                      # data parallel within a slice/node; -1 fills the rest
  h.fsdp = 1                       # fully sharded data parallel within a slice/node
  h.tensor = 1                     # tensor parallel within a slice/node
  h.dcn_data = 1                   # data parallel across slices/nodes
  h.dcn_fsdp = 1                   # fsdp across slices/nodes
  h.dcn_tensor = 1                 # tensor parallel across slices/nodes
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
  d.corpus = 'embedded'            # embedded (Django's catalogs, 36 languages) | prepared
  d.prepared_dir = ''              # prepared: the output directory of euro_lm.prepare_data
  d.languages = ''                 # comma-separated language tags to use; '' means all available
  d.tokenizer_path = ''            # existing SentencePiece .model; '' trains one into the workdir
  d.tokenizer_type = 'bpe'         # bpe | unigram, when training a tokenizer
  d.valid_fraction = 0.1           # share of each language's documents held out for validation
  d.seed = 0                       # shuffling and mixture-sampling seed
  d.add_bos = True                 # start every training document with the tokenizer's BOS
  d.add_eos = True                 # end every training document with the tokenizer's EOS
  d.mixture = 'natural'            # natural | temperature | unimax | explicit | groups
  d.mixture_weights = ''           # explicit: 'deu_Latn=2,fra_Latn=1' or staged '0:...;90000:...'
  d.mixture_temperature = 3.0      # temperature: p ~ tokens^(1/T)
  d.unimax_max_epochs = 4.0        # unimax: most passes over any language in train.steps
  d.mixture_groups = ''            # groups: 'eng_Latn=0.3;fra_Latn,spa_Latn=0.2;*=0.5' (natural within)
  d.mixture_min_share = 0.0        # groups: floor for every language's share

  c.distributed = x = ml_collections.ConfigDict()
  x.initialize = 'auto'            # auto (if a cluster env is detected) | always | never
  x.coordinator_address = ''       # host:port of process 0; '' lets JAX detect it
  x.num_processes = 0              # 0 lets JAX detect it
  x.process_id = -1                # -1 lets JAX detect it
  x.initialization_timeout = 300   # seconds for every process to join; then a clear error

  c.hardware = w = ml_collections.ConfigDict()
  w.peak_flops_per_device = 0.0    # for MFU; 0 looks the device up (known GPUs/TPUs), else omitted
  w.keep_freed_host_memory = True  # CPU runs: malloc keeps step temporaries (faster, more RSS)
  return c
