"""Does a euro_lm checkpoint compute what transformers computes from an HF folder?

`compare_with_transformers(hf_dir, workdir)` runs both on the same short multilingual texts
(tokenized with the run's tokenizer) in float32 on the CPU and reports, per text, the
largest logit difference and how often the two pick the same next token. It is what
`import_hf --check` and `export_hf --check` print. It needs torch and transformers (the
`hf` extra) and holds both models in host memory in float32.
"""

import numpy as np

from euro_lm.errors import UserError

# One sentence per script and a few language families; short, so large models check fast.
TEXTS = (
    ('eng_Latn', 'The hospital opens a new ward for children next spring.'),
    ('deu_Latn', 'Die Straße vor dem Rathaus wird im Mai für den Verkehr gesperrt.'),
    ('fra_Latn', "L'assemblée a voté le budget après trois jours de débats."),
    ('pol_Latn', 'Żółty samochód zatrzymał się przed szkołą o ósmej rano.'),
    ('fin_Latn', 'Kirjasto on avoinna arkisin kello yhdeksästä kahdeksaan.'),
    ('ell_Grek', 'Η βιβλιοθήκη είναι ανοιχτή κάθε μέρα εκτός Κυριακής.'),
    ('bul_Cyrl', 'Влакът за София тръгва от третия коловоз в десет часа.'),
)


def compare_with_transformers(hf_dir, workdir, step=None, log=print):
  """Logits of the HF folder `hf_dir` (transformers) against those of `workdir`'s
  checkpoint (newest, or `step`), both in float32. Returns {'max_abs_diff',
  'max_abs_logit', 'argmax_agreement'} over all texts, and logs a row per text."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError(
        f"comparing with transformers needs torch and transformers ({e}): pip install 'euro_lm[hf]'"
    ) from e
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from euro_lm.inference import load_run  # pylint: disable=import-outside-toplevel
  from euro_lm.model import Decoder  # pylint: disable=import-outside-toplevel

  run = load_run(workdir, step)
  model_config = run.config.model.copy_and_resolve_references()
  model_config.compute_dtype = 'float32'
  model_config.attention_impl = 'xla'  # the reference implementation, on any device
  decoder = Decoder(model_config)
  theirs = _model_class(transformers, hf_dir).from_pretrained(hf_dir, dtype=torch.float32).eval()
  bos = [run.tokenizer.bos_id] if run.config.data.add_bos else []
  rows = [bos + run.tokenizer.encode(text) for _, text in TEXTS]
  lengths = [len(r) for r in rows]
  # One right-padded batch: causal attention keeps padding out of every real position.
  tokens_BL = np.zeros((len(rows), max(lengths)), np.int32)
  valid_BL = np.arange(tokens_BL.shape[1]) < np.asarray(lengths)[:, None]
  for i, row in enumerate(rows):
    tokens_BL[i, : len(row)] = row
  ours_BLV = np.asarray(
      decoder.apply(
          {'params': run.params}, jnp.asarray(tokens_BL), jnp.asarray(valid_BL, jnp.int32)
      )
  )
  with torch.no_grad():
    reference_BLV = (
        theirs(torch.tensor(tokens_BL, dtype=torch.long), attention_mask=torch.tensor(valid_BL))
        .logits.float()
        .numpy()
    )
  log(f'{"text":<10} {"tokens":>6} {"max |Δ logit|":>14} {"same argmax":>12}')
  diffs, agree = [], 0
  for (tag, _), n, ours_LV, reference_LV in zip(TEXTS, lengths, ours_BLV, reference_BLV):
    diff = float(np.abs(ours_LV[:n] - reference_LV[:n]).max())
    same = int((ours_LV[:n].argmax(-1) == reference_LV[:n].argmax(-1)).sum())
    diffs.append(diff)
    agree += same
    log(f'{tag:<10} {n:>6} {diff:>14.2e} {same:>6}/{n:<5}')
  total = sum(lengths)
  scale = max(float(np.abs(r[:n]).max()) for r, n in zip(reference_BLV, lengths))
  result = {
      'max_abs_diff': max(diffs),
      'max_abs_logit': scale,
      'argmax_agreement': agree / total,
  }
  log(
      f'largest difference {result["max_abs_diff"]:.2e} on logits up to '
      f'{result["max_abs_logit"]:.1f}; the same next token at {agree} of {total} positions'
  )
  return result


def _model_class(transformers, hf_dir):
  """The class the folder's config.json names (a multimodal one, Mistral 3's, is no
  AutoModelForCausalLM; its logits on text are the language model's), else
  AutoModelForCausalLM."""
  names = transformers.AutoConfig.from_pretrained(hf_dir).architectures or [None]
  return getattr(transformers, names[0] or '', None) or transformers.AutoModelForCausalLM
