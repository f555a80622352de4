"""Text generation from a training run's checkpoint, with a KV cache.

`python -m euro_lm.generate --workdir=DIR --prompt "Once" [--prompt "Il était"]
[--max_new_tokens=64] [--temperature=0.8] [--top_k=0] [--top_p=0.95] [--seed=0] [--step=N]
[--chat]`

All prompts run as one left-padded batch; `--temperature=0` is greedy. Library use:
`euro_lm.inference.load_run(workdir)` then `complete(run, prompts, ...)`.
"""

from absl import app, flags, logging

from euro_lm import cli
from euro_lm.errors import UserError
from euro_lm.inference import complete, load_run

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'A prompt; repeat for a batch.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Most new tokens per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 is off.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass; 1 is off.')
_SEED = flags.DEFINE_integer('seed', 0, 'PRNG seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest.')
_CHAT = flags.DEFINE_bool(
    'chat',
    False,
    "Each prompt is a user message in the run's chat template; answers end at its turn end.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  if not _WORKDIR.value or not _PROMPT.value:
    raise UserError('give --workdir and at least one --prompt')
  run = load_run(_WORKDIR.value, _STEP.value)
  texts = complete(
      run,
      _PROMPT.value,
      max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
      chat_messages=_CHAT.value,
  )
  print(f'# {run.step_dir}')
  for prompt, text in zip(_PROMPT.value, texts):
    print(f'--- {prompt!r}\n{text}' if _CHAT.value else f'--- {prompt!r}\n{prompt}{text}')


if __name__ == '__main__':
  cli.run(main)
