"""AdamW with a weight-decay mask, global-norm clipping and learning-rate schedules."""

import jax
import optax


def learning_rate_schedule(optimizer_config, total_steps):
  """Linear warmup, then cosine decay, warmup-stable-decay (WSD), or constant.

  A warmup longer than the run is cut to the run (short debugging runs keep the preset's
  warmup_steps).
  """
  o = optimizer_config
  peak, floor = o.learning_rate, o.learning_rate * o.min_lr_ratio
  warmup_steps = min(o.warmup_steps, total_steps)
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  after = total_steps - warmup_steps
  if o.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, max(after, 1), alpha=o.min_lr_ratio)
  elif o.schedule == 'wsd':
    decay_steps = min(max(int(round(total_steps * o.decay_fraction)), 1), max(after, 1))
    main = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)],
        [max(after - decay_steps, 0)],
    )
  elif o.schedule == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f'optimizer.schedule={o.schedule!r} is unknown')
  return optax.join_schedules([warmup, main], [warmup_steps])


def decay_mask(params, decay_embeddings):
  """True for weights that get weight decay: matrices, not norms nor xIELU's scalars (nor,
  by default, the embedding and untied output matrices)."""

  def decays(path, _):
    names = [getattr(k, 'key', getattr(k, 'name', '')) for k in path]
    if any(str(n).endswith('norm') or str(n).startswith('xielu') for n in names):
      return False
    if 'embedding' in names or 'output' in names:
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optimizer_config, total_steps):
  """Returns `(optax transformation, schedule)`.

  The schedule is indexed by optimizer updates done so far; the k-th update (1-based)
  uses `learning_rate_schedule(k)`, so the first update is not wasted at lr 0 and the last
  one lands on the final learning rate.
  """
  o = optimizer_config
  full = learning_rate_schedule(o, total_steps)
  schedule = lambda count: full(count + 1)
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule,
          b1=o.b1,
          b2=o.b2,
          eps=o.eps,
          weight_decay=o.weight_decay,
          mask=lambda p: decay_mask(p, o.decay_embeddings),
      )
  )
  return optax.chain(*parts), schedule
