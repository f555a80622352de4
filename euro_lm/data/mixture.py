"""Per-language sampling weights: explicit, temperature, UniMax, group shares.

Every method maps `{language_tag: number}` to weights that sum to 1, keyed by
canonical tag in sorted order; `de` and `deu_Latn` name the same language.
Bad settings raise `ConfigError`; each function takes `field`, the config path
its arguments came from, and every message starts with it.

`MixtureSchedule` switches between weight sets at given steps. `parse_weights`
and `parse_stages` read the string forms a command-line override uses:

  deu_Latn=0.3,fra_Latn=0.2
  0:deu_Latn=1,gle_Latn=0;90000:deu_Latn=1,gle_Latn=3

Fine-tuning data can come from named sources (`parse_sources`); explicit weights and
schedules then weigh sources instead of languages (`names=source_name`), in the same forms.
"""

import bisect
import difflib
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from euro_lm.data.languages import LANGUAGES, canonical_language
from euro_lm.data.streams import REPLAY_PREFIX
from euro_lm.errors import ConfigError

# Group shares are typed as decimals; this absorbs their rounding and still
# catches a forgotten group.
SHARE_TOLERANCE = 1e-6

# Every spelling canonical_language accepts, lowercased -> its tag: what a
# misspelt tag is compared with to suggest the closest one.
_SPELLINGS = {
    spelling.lower(): lang.tag
    for lang in LANGUAGES
    for spelling in (lang.tag, lang.iso639_1, lang.iso639_3, lang.iso639_2b)
    if spelling
}
# difflib's default: below it a "closest" spelling is mostly noise.
_SUGGESTION_CUTOFF = 0.6
# A source's name: a letter, then letters, digits, _ or -.
_SOURCE_NAME = re.compile(r'[A-Za-z][A-Za-z0-9_-]*')


# --- validation helpers --------------------------------------------------------


def _canonical(code: str, field: str) -> str:
  """canonical_language, raising ConfigError with the closest known tag."""
  try:
    return canonical_language(code)
  except ValueError as e:
    message = f'{field}: {e}'
    typed = code.strip().lower()
    if typed.replace('-', '_').split('_')[0] in _SPELLINGS:
      # A known language in the wrong script: the message names its tag.
      raise ConfigError(message) from None
    ratios = {
        spelling: difflib.SequenceMatcher(None, typed, spelling).ratio() for spelling in _SPELLINGS
    }
    best = max(ratios.values())
    # All ties: a swapped pair of letters (`gel`) is as close to `gle` as to
    # `glg`, and picking one would often pick the wrong one.
    closest = sorted({_SPELLINGS[s] for s, r in ratios.items() if r == best})
    if best >= _SUGGESTION_CUTOFF:
      message += f' Did you mean {" or ".join(map(repr, closest))}?'
    raise ConfigError(message) from None


def source_name(name: str, field: str) -> str:
  """`name` if it can name a source (a letter, then letters, digits, _ or -), else
  ConfigError naming `field`: the `names` argument that makes weights weigh sources."""
  if not _SOURCE_NAME.fullmatch(name) or name.startswith(REPLAY_PREFIX):
    raise ConfigError(
        f'{field}: {name!r} is not a source name (a letter, then letters, digits, _ or -;'
        f' not starting with {REPLAY_PREFIX!r}, which names replayed text)'
    )
  return name


def parse_sources(text: str, *, field: str) -> dict[str, list[str]]:
  """Reads 'clinic=/d/a/*.jsonl,faq=/d/prepared' into {name: [entries]}; an entry's name
  is what precedes its first '=' when that is a source name (a repeated name adds entries
  to the source). Unnamed entries, 'a/*.jsonl,b/*.jsonl', are one source named ''.

  Raises:
    ConfigError: named and unnamed entries mixed, or an empty entry.
  """
  sources = {}
  for entry in (e.strip() for e in text.split(',')):
    name, equals, path = entry.partition('=')
    if not equals or not _SOURCE_NAME.fullmatch(name.strip()):
      name, path = '', entry
    else:
      name, path = source_name(name.strip(), field), path.strip()
    if not path:
      raise ConfigError(f'{field}: an empty entry in {text!r}')
    if sources and ('' in sources) != (name == ''):
      raise ConfigError(
          f'{field}: {entry!r}: name every entry (NAME=GLOB_OR_DIR) or none, in {text!r}'
      )
    sources.setdefault(name, []).append(path)
  return sources


def _number(value, name: str, field: str) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ConfigError(f'{field}: {name}={value!r} is not a number') from None


# Folds a weight's key: a language code to its tag (the default), or a source's name.
Names = Callable[[str, str], str]


def _fold(
    values: Mapping[str, float], field: str, where: str = '', names: Names = _canonical
) -> dict[str, float]:
  """Canonical tags (or `names`) -> finite non-negative floats, sorted by tag."""
  folded, spelled = {}, {}
  for code, value in values.items():
    tag = names(code, field)
    if tag in folded:
      raise ConfigError(f'{field}: {spelled[tag]!r} and {code!r}{where} both name {tag}')
    number = _number(value, code, field)
    if not (math.isfinite(number) and number >= 0):
      raise ConfigError(f'{field}: {tag}={number}{where} must be finite and >= 0')
    folded[tag], spelled[tag] = number, code
  return dict(sorted(folded.items()))


def _normalise(weights: dict[str, float], field: str, where: str = '') -> dict[str, float]:
  total = sum(weights.values())
  if not total > 0:
    raise ConfigError(
        f'{field}: the weights{where} sum to {total}; they must sum to a positive number'
    )
  return {tag: w / total for tag, w in weights.items()}


def _fold_counts(token_counts: Mapping[str, float], field: str):
  counts = _fold(token_counts, field, ' (token count)')
  if not any(counts.values()):
    raise ConfigError(f'{field}: no language has any tokens: {counts}')
  return counts


def _tempered(counts: dict[str, float], temperature: float):
  """n^(1/T) normalised; languages without tokens get 0, even at T=inf."""
  # In log space: n^(1/T) overflows float64 for big corpora at small T.
  logs = {tag: math.log(n) for tag, n in counts.items() if n > 0}
  top = max(logs.values())
  powered = {
      tag: math.exp((logs[tag] - top) / temperature) if tag in logs else 0.0 for tag in counts
  }
  total = sum(powered.values())  # >= 1: the largest language contributes 1.
  return {tag: p / total for tag, p in powered.items()}


# --- methods -------------------------------------------------------------------


def explicit_weights(
    weights: Mapping[str, float],
    available: Iterable[str],
    *,
    field: str,
    names: Names = _canonical,
) -> dict[str, float]:
  """Normalises weights given per language (or per source, with `names=source_name`).

  Only the languages named come back; an explicit 0 stays (a schedule stage
  that leaves a language out). Every language named must be in `available`,
  the languages that have data.
  """
  folded = _fold(weights, field, names=names)
  available = {names(tag, field) for tag in available}
  missing = sorted(set(folded) - available)
  if missing:
    raise ConfigError(
        f'{field}: no data for {", ".join(missing)}; languages with data:'
        f' {", ".join(sorted(available)) or "none"}'
    )
  return _normalise(folded, field)


def temperature_weights(
    token_counts: Mapping[str, float], temperature: float, *, field: str
) -> dict[str, float]:
  """p_i ∝ n_i^(1/T): T=1 natural shares, T>1 flatter, T=inf uniform."""
  counts = _fold_counts(token_counts, field)
  temperature = _number(temperature, 'temperature', field)
  if not temperature > 0:
    raise ConfigError(f'{field}: temperature={temperature} must be positive')
  return _tempered(counts, temperature)


class UniMax(NamedTuple):
  """What unimax_weights returns."""

  # Share of the token budget per language, summing to 1.
  weights: dict[str, float]
  # Passes over each language's data the budget makes (0 without data).
  epochs: dict[str, float]
  # '' when the budget fits within max_epochs; else what was done instead.
  warning: str


def unimax_weights(
    token_counts: Mapping[str, float],
    total_tokens: float,
    max_epochs: float,
    *,
    field: str,
) -> UniMax:
  """UniMax (Chung et al. 2023): uniform over languages, capped in epochs.

  Each language gets an equal part of `total_tokens` but at most
  `max_epochs * n_i`; what a capped language cannot take is spread equally
  over the larger ones. If all languages at their caps hold less than the
  budget, the capped shares are returned renormalised (which are the natural
  shares), every language repeats more than `max_epochs`, and `warning` says
  so: a result to report, not an error, since the caller may accept it.
  """
  counts = _fold_counts(token_counts, field)
  total_tokens = _number(total_tokens, 'total_tokens', field)
  max_epochs = _number(max_epochs, 'max_epochs', field)
  for name, value in (('total_tokens', total_tokens), ('max_epochs', max_epochs)):
    if not 0 < value < math.inf:
      raise ConfigError(f'{field}: {name}={value} must be positive and finite')

  budgets = {}
  remaining = total_tokens
  # Smallest first: once a language's uniform part fits under its cap, so do
  # those of all larger languages, and the rest is split evenly among them.
  by_size = sorted(counts, key=lambda tag: (counts[tag], tag))
  for i, tag in enumerate(by_size):
    budgets[tag] = min(remaining / (len(by_size) - i), max_epochs * counts[tag])
    remaining -= budgets[tag]
  weights = _normalise(dict(sorted(budgets.items())), field)
  epochs = {
      tag: total_tokens * w / counts[tag] if counts[tag] else 0.0 for tag, w in weights.items()
  }

  warning = ''
  available = sum(counts.values())
  if max_epochs * available < total_tokens:
    warning = (
        f'{field}: the {len(counts)} languages hold {available:,.0f} tokens;'
        f' at max_epochs={max_epochs:g} that is {max_epochs * available:,.0f}'
        f' of total_tokens={total_tokens:,.0f}. Using natural shares, so'
        f' every language repeats {total_tokens / available:.3g} epochs.'
    )
  return UniMax(weights, epochs, warning)


def group_share_weights(
    token_counts: Mapping[str, float],
    groups: Mapping[str, str | Sequence[str]],
    shares: Mapping[str, float],
    min_share: float = 0.0,
    within_group: str | float = 'natural',
    *,
    field: str,
) -> dict[str, float]:
  """Fixed shares for named groups of languages, then a floor per language.

  Args:
    token_counts: tokens per language; every language here is in one group.
    groups: group name -> its tags (a list, or a comma-separated string), or
      '*' for every language no other group names (at most one such group).
    shares: group name -> its share of all tokens; they sum to 1.
    min_share: every language gets at least this much. The floor is paid by
      the languages above it in proportion to their weights, so group totals
      can move away from `shares` by up to `min_share` per floored language.
    within_group: 'natural' (by token counts) or a temperature T, spreading
      a group's share by n^(1/T) as in temperature_weights.
    field: the config path these came from, for error messages.

  Returns:
    Weights per language, summing to 1.
  """
  counts = _fold_counts(token_counts, field)
  members = _group_members(groups, counts, field)
  if set(shares) != set(members):
    raise ConfigError(
        f'{field}: shares are for groups {sorted(shares)} but the groups are {sorted(members)}'
    )
  group_shares = {
      name: _number(share, f'shares[{name!r}]', field) for name, share in shares.items()
  }
  for name, share in group_shares.items():
    if not (math.isfinite(share) and share >= 0):
      raise ConfigError(f'{field}: shares[{name!r}]={share} must be >= 0')
  if abs(sum(group_shares.values()) - 1) > SHARE_TOLERANCE:
    raise ConfigError(f'{field}: shares sum to {sum(group_shares.values())}, not 1: {group_shares}')
  temperature = _within_group_temperature(within_group, field)
  min_share = _number(min_share, 'min_share', field)
  if not 0 <= min_share * len(counts) <= 1 + SHARE_TOLERANCE:
    raise ConfigError(
        f'{field}: min_share={min_share} for {len(counts)} languages asks for'
        f' {min_share * len(counts):g} of the mixture; it must be in [0, 1]'
    )
  empty = [tag for tag, n in counts.items() if n == 0]
  if min_share > 0 and empty:
    raise ConfigError(
        f'{field}: min_share={min_share} cannot be met by {", ".join(empty)}, which have no tokens'
    )

  weights = {}
  for name, tags in members.items():
    group_counts = {tag: counts[tag] for tag in tags}
    if any(group_counts.values()):
      tempered = _tempered(group_counts, temperature)
      weights.update({tag: group_shares[name] * p for tag, p in tempered.items()})
    elif group_shares[name] > 0:
      raise ConfigError(
          f'{field}: group {name!r} has share {group_shares[name]} but its'
          f' languages ({", ".join(tags) or "none"}) have no tokens'
      )
    else:
      weights.update(dict.fromkeys(tags, 0.0))
  return _normalise(_with_floor(dict(sorted(weights.items())), min_share), field)


def _group_members(groups, counts, field) -> dict[str, list[str]]:
  """Group name -> canonical tags, checking each language is in one group."""
  members, owner = {}, {}
  remainder = None
  for name, spec in groups.items():
    if spec == '*':
      if remainder is not None:
        raise ConfigError(f"{field}: groups {remainder!r} and {name!r} are both '*'")
      remainder = name
      continue
    codes = spec.split(',') if isinstance(spec, str) else spec
    members[name] = []
    for code in codes:
      tag = _canonical(code, field)
      if tag in owner:
        raise ConfigError(
            f'{field}: {tag} is listed twice (groups {owner[tag]!r} and'
            f' {name!r}); a language belongs to one group'
        )
      owner[tag] = name
      members[name].append(tag)
  missing = sorted(set(owner) - set(counts))
  if missing:
    raise ConfigError(f'{field}: groups name {", ".join(missing)}, which have no data')
  rest = [tag for tag in counts if tag not in owner]
  if remainder is not None:
    members[remainder] = rest
  elif rest:
    raise ConfigError(
        f'{field}: {", ".join(rest)} have data but are in no group; add them'
        " to a group or add a group '*' for the rest"
    )
  return members


def _within_group_temperature(within_group, field) -> float:
  if within_group == 'natural':
    return 1.0
  if isinstance(within_group, numbers.Real) and within_group > 0:
    return float(within_group)
  raise ConfigError(
      f"{field}: within_group={within_group!r} must be 'natural' or a positive temperature"
  )


def _with_floor(weights: dict[str, float], min_share: float):
  """Raises every weight to min_share, scaling the others down to pay for it.

  Scaling down can push another language under the floor, so the floored set
  grows until none is left below it.
  """
  floored = set()
  while True:
    free = [tag for tag in weights if tag not in floored]
    free_total = sum(weights[tag] for tag in free)
    left = 1 - min_share * len(floored)
    below = {tag for tag in free if weights[tag] * left < min_share * free_total}
    if not below:
      break
    floored |= below
  return {tag: min_share if tag in floored else w * left / free_total for tag, w in weights.items()}


# --- stages --------------------------------------------------------------------


class MixtureSchedule:
  """Weights that change at given steps.

  A stage holds from its start step until the next stage starts. Stages list
  the same languages (0 for one that sits a stage out), so a language is
  never dropped by a forgotten entry. Each stage's weights are normalised.
  """

  def __init__(
      self,
      stages: Sequence[tuple[int, Mapping[str, float]]],
      *,
      field: str,
      names: Names = _canonical,
  ):
    if not stages:
      raise ConfigError(f'{field}: a mixture schedule needs at least one stage')
    starts = []
    for start, _ in stages:
      if not isinstance(start, numbers.Integral) or isinstance(start, bool):
        raise ConfigError(f'{field}: stage start {start!r} is not an integer step')
      starts.append(int(start))
    if starts[0] != 0:
      raise ConfigError(f'{field}: the first stage starts at step {starts[0]}; it must start at 0')
    for before, after in zip(starts, starts[1:]):
      if after <= before:
        raise ConfigError(
            f'{field}: stage starts must increase, but step {after} follows step {before}'
        )
    weights = []
    for start, (_, stage) in zip(starts, stages):
      where = f' in the stage at step {start}'
      weights.append(_normalise(_fold(stage, field, where, names), field, where))
    languages = set(weights[0])
    for start, stage in zip(starts[1:], weights[1:]):
      if set(stage) != languages:
        lacks = ', '.join(sorted(languages - set(stage))) or 'none'
        adds = ', '.join(sorted(set(stage) - languages)) or 'none'
        raise ConfigError(
            f'{field}: the stage at step {start} lacks {lacks} and adds {adds}'
            ' compared with step 0; every stage lists the same languages,'
            ' with weight 0 where one sits a stage out'
        )
    self._starts = starts
    self.stages: tuple[tuple[int, dict[str, float]], ...] = tuple(zip(starts, weights))

  @property
  def languages(self) -> tuple[str, ...]:
    return tuple(self.stages[0][1])

  def weights_at(self, step: int) -> dict[str, float]:
    """The weights of the stage in force at `step`."""
    if step < 0:
      raise ValueError(f'step={step} must be >= 0')
    return dict(self.stages[bisect.bisect_right(self._starts, step) - 1][1])


def parse_weights(text: str, *, field: str, names: Names = _canonical) -> dict[str, float]:
  """Reads 'deu_Latn=0.3,fra_Latn=0.2' (raw weights; tags folded)."""
  return _parse_weights(text, field, '', names)


def _parse_weights(text: str, field: str, where: str, names: Names) -> dict[str, float]:
  weights = {}
  for entry in text.split(','):
    code, equals, value = entry.partition('=')
    if not equals or not code.strip():
      raise ConfigError(f'{field}: expected TAG=WEIGHT, got {entry!r}{where}')
    tag = names(code.strip(), field)
    if tag in weights:
      raise ConfigError(f'{field}: {tag} is given twice{where}: {entry!r}')
    try:
      weights[tag] = float(value)
    except ValueError:
      raise ConfigError(
          f'{field}: weight {value.strip()!r} in {entry!r}{where} is not a number'
      ) from None
  return weights


def parse_stages(
    text: str, *, field: str, names: Names = _canonical
) -> list[tuple[int, dict[str, float]]]:
  """Reads 'STEP:TAG=W,...;STEP:TAG=W,...' into stages for MixtureSchedule."""
  stages = []
  for stage in text.split(';'):
    start, colon, weights = stage.partition(':')
    if not colon:
      raise ConfigError(f'{field}: expected STEP:TAG=WEIGHT,... , got stage {stage!r}')
    try:
      step = int(start)
    except ValueError:
      raise ConfigError(
          f'{field}: step {start.strip()!r} of stage {stage!r} is not an integer'
      ) from None
    stages.append((step, _parse_weights(weights, field, f' in stage {stage!r}', names)))
  return stages


def weight_schedule(
    text: str, available: Iterable[str], *, field: str, names: Names = _canonical
) -> MixtureSchedule:
  """The schedule of explicit weights 'A=2,B=1', or staged 'STEP:A=2,B=1;STEP:...', each
  name in `available`."""
  if ':' in text:
    stages = parse_stages(text, field=field, names=names)
  else:
    stages = [(0, parse_weights(text, field=field, names=names))]
  available = list(available)
  for _, weights in stages:
    explicit_weights(weights, available, field=field, names=names)
  return MixtureSchedule(stages, field=field, names=names)


def source_schedule(text: str, sources: Iterable[str], *, field: str) -> MixtureSchedule:
  """`weight_schedule` over named sources (`source_name`), every source weighed."""
  sources = list(sources)
  schedule = weight_schedule(text, sources, field=field, names=source_name)
  missing = sorted(set(sources) - set(schedule.languages))
  if missing:
    raise ConfigError(
        f'{field}: no weight for source(s) {", ".join(missing)}; weigh every source'
        ' (0 leaves one out)'
    )
  return schedule


def format_weights(weights: Mapping[str, float]) -> str:
  """The parse_weights form of `weights`; repr keeps floats exact."""
  return ','.join(f'{tag}={float(w)!r}' for tag, w in weights.items())


def format_stages(stages: Iterable[tuple[int, Mapping[str, float]]]) -> str:
  """The parse_stages form of `stages`."""
  return ';'.join(f'{start}:{format_weights(w)}' for start, w in stages)


def realised_shares(token_counts: Mapping[str, float]) -> dict[str, float]:
  """Each language's share of the tokens seen so far (all 0 before any)."""
  total = sum(token_counts.values())
  return {tag: float(n / total) if total else 0.0 for tag, n in sorted(token_counts.items())}
