"""`python -m euro_lm.import_hf --hf=HFDIR --workdir=DIR [--chat_template=default|FILE] [--check]`

Reads a local Hugging Face Llama-family folder (safetensors) into a params-only euro_lm
checkpoint that `--config.train.init_from=DIR` starts from (see euro_lm.hf).
"""

from absl import app, flags, logging

from euro_lm import cli

_HF = flags.DEFINE_string('hf', None, 'Local HF model folder (config.json + *.safetensors).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'New directory for the euro_lm checkpoint.')
_CHECK = flags.DEFINE_bool(
    'check',
    False,
    'Then run transformers on the HF folder and euro_lm on the checkpoint (float32, CPU) and'
    ' print how far their logits differ (needs the hf extra and memory for both models).',
)
_CHAT_TEMPLATE = flags.DEFINE_string(
    'chat_template',
    '',
    "The imported tokenizer's chat template, replacing the folder's: 'default' (euro_lm's"
    ' ChatML template; its <|im_start|>/<|im_end|> are added as single ids with new'
    ' embedding rows if the tokenizer lacks them) or a .jinja file.',
)
flags.mark_flags_as_required(['hf', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  from euro_lm.hf import import_hf
  from euro_lm.hf.check import compare_with_transformers

  import_hf(_HF.value, _WORKDIR.value, chat_template=_CHAT_TEMPLATE.value)
  if _CHECK.value:
    compare_with_transformers(_HF.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
