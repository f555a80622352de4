"""Tests for euro_lm.data.mixture: sampling weights, schedules, their strings."""

import math
import re

import numpy as np
import pytest

from euro_lm.data import mixture
from euro_lm.data.languages import LANGUAGES
from euro_lm.errors import ConfigError

FIELD = 'data.mixture'


def _raises(message):
  """ConfigError whose message starts with FIELD and contains `message`."""
  return pytest.raises(ConfigError, match=f'^{re.escape(FIELD)}: .*{re.escape(message)}')


# --- explicit weights ----------------------------------------------------------


def test_explicit_weights_normalise_and_keep_only_named_languages():
  weights = mixture.explicit_weights(
      {'deu_Latn': 3, 'fra_Latn': 1},
      ['deu_Latn', 'fra_Latn', 'gle_Latn'],
      field=FIELD,
  )
  assert weights == {'deu_Latn': 0.75, 'fra_Latn': 0.25}


def test_explicit_weights_fold_aliases_and_keep_explicit_zeros():
  weights = mixture.explicit_weights(
      {'FR': 1, 'de': 1, 'ga': 0}, {'deu': 5, 'fr': 5, 'gle_Latn': 5}, field=FIELD
  )
  assert weights == {'deu_Latn': 0.5, 'fra_Latn': 0.5, 'gle_Latn': 0.0}
  assert list(weights) == sorted(weights)


def test_explicit_weights_suggest_the_closest_tag():
  with _raises("'gel_Latn'") as e:
    mixture.explicit_weights({'gel_Latn': 1}, ['gle_Latn'], field=FIELD)
  # A swapped pair is as close to glg as to gle (and to Gaelic gla, Manx glv): all offered.
  assert str(e.value).endswith("Did you mean 'gla_Latn' or 'gle_Latn' or 'glg_Latn' or 'glv_Latn'?")


def test_explicit_weights_explain_a_wrong_script():
  with _raises("names script 'Cyrl', but euro_lm has German only as 'deu_Latn'.") as e:
    mixture.explicit_weights({'deu_Cyrl': 1}, ['deu_Latn'], field=FIELD)
  assert 'Did you mean' not in str(e.value)


def test_explicit_weights_without_a_close_tag_point_to_the_list():
  with _raises("Unknown language code 'qqq'") as e:
    mixture.explicit_weights({'qqq': 1}, ['deu_Latn'], field=FIELD)
  assert 'Did you mean' not in str(e.value)


@pytest.mark.parametrize(
    'weights, message',
    [
        ({'deu_Latn': 1, 'fra_Latn': -1}, 'fra_Latn=-1.0 must be finite and >= 0'),
        ({'deu_Latn': math.nan}, 'deu_Latn=nan must be finite and >= 0'),
        ({'deu_Latn': math.inf}, 'deu_Latn=inf must be finite and >= 0'),
        ({'deu_Latn': 0, 'fra_Latn': 0.0}, 'the weights sum to 0.0; they must sum to a positive'),
        ({}, 'the weights sum to 0; they must sum to a positive'),
        ({'deu_Latn': 'lots'}, "deu_Latn='lots' is not a number"),
        ({'de': 1, 'deu_Latn': 2}, "'de' and 'deu_Latn' both name deu_Latn"),
    ],
)
def test_explicit_weights_reject_bad_values(weights, message):
  with _raises(message):
    mixture.explicit_weights(weights, ['deu_Latn', 'fra_Latn'], field=FIELD)


def test_explicit_weights_list_languages_without_data():
  with _raises('no data for gle_Latn, mlt_Latn; languages with data: deu_Latn'):
    mixture.explicit_weights(
        {'mlt_Latn': 1, 'deu_Latn': 1, 'gle_Latn': 0}, ['deu_Latn'], field=FIELD
    )


# --- temperature ---------------------------------------------------------------


@pytest.mark.parametrize(
    'temperature, expected',
    [
        # 100^(1/T) : 1^(1/T).
        (1, {'deu_Latn': 100 / 101, 'gle_Latn': 1 / 101}),
        (2, {'deu_Latn': 10 / 11, 'gle_Latn': 1 / 11}),
        (0.5, {'deu_Latn': 10_000 / 10_001, 'gle_Latn': 1 / 10_001}),
        (math.inf, {'deu_Latn': 0.5, 'gle_Latn': 0.5}),
    ],
)
def test_temperature_weights_by_hand(temperature, expected):
  weights = mixture.temperature_weights({'deu_Latn': 100, 'gle_Latn': 1}, temperature, field=FIELD)
  assert weights == pytest.approx(expected, rel=1e-12)


def test_temperature_flattens_towards_uniform():
  counts = {'eng_Latn': 1e12, 'deu_Latn': 1e10, 'mlt_Latn': 1e6}
  smallest = [
      mixture.temperature_weights(counts, t, field=FIELD)['mlt_Latn'] for t in (1, 2, 5, 100, 1e6)
  ]
  assert smallest == sorted(smallest)
  assert smallest[-1] == pytest.approx(1 / 3, rel=1e-4)


def test_temperature_does_not_overflow_at_low_temperature():
  # (1e13 / 1e7)^(1/0.05) = 1e120: n^(1/T) itself would be 1e260 for English.
  weights = mixture.temperature_weights({'eng_Latn': 1e13, 'mlt_Latn': 1e7}, 0.05, field=FIELD)
  assert weights['eng_Latn'] == 1.0
  assert weights['mlt_Latn'] == pytest.approx(1e-120, rel=1e-9)


def test_temperature_gives_nothing_to_languages_without_tokens():
  for temperature in (1, math.inf):
    weights = mixture.temperature_weights(
        {'deu_Latn': 10, 'gle_Latn': 0, 'fra_Latn': 10}, temperature, field=FIELD
    )
    assert weights == {'deu_Latn': 0.5, 'fra_Latn': 0.5, 'gle_Latn': 0.0}


@pytest.mark.parametrize(
    'counts, temperature, message',
    [
        ({'deu_Latn': 1}, 0, 'temperature=0.0 must be positive'),
        ({'deu_Latn': 1}, -2, 'temperature=-2.0 must be positive'),
        ({'deu_Latn': 1}, math.nan, 'temperature=nan must be positive'),
        ({'deu_Latn': 1}, 'hot', "temperature='hot' is not a number"),
        ({'deu_Latn': 0, 'fra_Latn': 0}, 1, 'no language has any tokens'),
        ({'deu_Latn': -5}, 1, 'deu_Latn=-5.0 (token count) must be finite and >= 0'),
        ({'xx_Latn': 5}, 1, "Unknown language code 'xx_Latn'"),
    ],
)
def test_temperature_weights_reject_bad_input(counts, temperature, message):
  with _raises(message):
    mixture.temperature_weights(counts, temperature, field=FIELD)


# --- UniMax --------------------------------------------------------------------


def test_unimax_one_language_at_its_cap():
  # Budget 3000 over 3 languages, max 4 epochs, smallest first:
  #   gle (100 tokens): uniform 3000/3 = 1000 > cap 4*100 = 400 -> 400, 2600 left;
  #   fra (2000):       uniform 2600/2 = 1300 <= cap 8000        -> 1300, 1300 left;
  #   deu (10000):      1300 <= cap 40000                        -> 1300.
  result = mixture.unimax_weights(
      {'deu_Latn': 10_000, 'fra_Latn': 2_000, 'gle_Latn': 100},
      total_tokens=3_000,
      max_epochs=4,
      field=FIELD,
  )
  assert result.weights == pytest.approx(
      {'deu_Latn': 1300 / 3000, 'fra_Latn': 1300 / 3000, 'gle_Latn': 400 / 3000}
  )
  assert result.epochs == pytest.approx({'deu_Latn': 0.13, 'fra_Latn': 0.65, 'gle_Latn': 4.0})
  assert result.warning == ''


def test_unimax_redistribution_can_cap_the_next_language():
  # Max 2 epochs. mlt's cap (1100) is above the plain uniform part (1000) but
  # below its part once gle's excess is redistributed:
  #   gle (100):   3000/3 = 1000 > cap 200  -> 200, 2800 left;
  #   mlt (550):   2800/2 = 1400 > cap 1100 -> 1100, 1700 left;
  #   deu (10000): 1700 <= cap 20000        -> 1700.
  result = mixture.unimax_weights(
      {'deu_Latn': 10_000, 'mlt_Latn': 550, 'gle_Latn': 100}, 3_000, 2, field=FIELD
  )
  assert result.weights == pytest.approx(
      {'deu_Latn': 1700 / 3000, 'gle_Latn': 200 / 3000, 'mlt_Latn': 1100 / 3000}
  )
  assert result.epochs['gle_Latn'] == pytest.approx(2)
  assert result.epochs['mlt_Latn'] == pytest.approx(2)


def test_unimax_is_uniform_when_no_cap_binds():
  result = mixture.unimax_weights(
      {'deu_Latn': 1e9, 'fra_Latn': 1e8, 'gle_Latn': 1e7}, 3e6, 1, field=FIELD
  )
  assert result.weights == pytest.approx(dict.fromkeys(result.weights, 1 / 3))


def test_unimax_falls_back_to_natural_shares_when_the_budget_is_too_big():
  # Caps 2*100 + 2*300 = 800 < 10000: both languages capped, shares 200:600.
  result = mixture.unimax_weights({'gle_Latn': 100, 'mlt_Latn': 300}, 10_000, 2, field=FIELD)
  assert result.weights == pytest.approx({'gle_Latn': 0.25, 'mlt_Latn': 0.75})
  # 10000 tokens from 400: every language repeats 25 times.
  assert result.epochs == pytest.approx({'gle_Latn': 25, 'mlt_Latn': 25})
  assert result.warning.startswith(f'{FIELD}: the 2 languages hold 400 tokens')
  assert 'max_epochs=2 that is 800 of total_tokens=10,000' in result.warning
  assert 'repeats 25 epochs' in result.warning


def test_unimax_gives_nothing_to_languages_without_tokens():
  result = mixture.unimax_weights({'gle_Latn': 0, 'deu_Latn': 1000}, 500, 1, field=FIELD)
  assert result.weights == {'deu_Latn': 1.0, 'gle_Latn': 0.0}
  assert result.epochs == {'deu_Latn': 0.5, 'gle_Latn': 0.0}


def _water_level_budgets(counts, total_tokens, max_epochs):
  """Independent UniMax: the level u with sum(min(u, cap_i)) = total, by bisection."""
  caps = max_epochs * np.asarray(counts, np.float64)
  low, high = 0.0, float(total_tokens)
  for _ in range(200):
    level = (low + high) / 2
    low, high = (level, high) if np.minimum(level, caps).sum() < total_tokens else (low, level)
  return np.minimum(high, caps)


@pytest.mark.parametrize('seed', range(20))
def test_unimax_matches_water_filling_and_never_exceeds_the_cap(seed):
  rng = np.random.default_rng(seed)
  tags = [lang.tag for lang in rng.choice(LANGUAGES, rng.integers(2, 12), replace=False)]
  counts = dict(zip(tags, 10 ** rng.uniform(2, 10, len(tags))))
  total_tokens = 10 ** rng.uniform(4, 11)
  max_epochs = rng.uniform(0.5, 8)
  result = mixture.unimax_weights(counts, total_tokens, max_epochs, field=FIELD)

  weights = np.array([result.weights[t] for t in tags])
  assert (weights >= 0).all()
  assert weights.sum() == pytest.approx(1, abs=1e-12)
  if max_epochs * sum(counts.values()) >= total_tokens:
    assert result.warning == ''
    assert max(result.epochs.values()) <= max_epochs * (1 + 1e-12)
    expected = _water_level_budgets(list(counts.values()), total_tokens, max_epochs)
    np.testing.assert_allclose(weights * total_tokens, expected, rtol=1e-9)
  else:
    assert result.warning
    natural = np.array(list(counts.values())) / sum(counts.values())
    np.testing.assert_allclose(weights, natural, rtol=1e-12)


@pytest.mark.parametrize(
    'total_tokens, max_epochs, message',
    [
        (0, 4, 'total_tokens=0.0 must be positive and finite'),
        (-10, 4, 'total_tokens=-10.0 must be positive and finite'),
        (math.inf, 4, 'total_tokens=inf must be positive and finite'),
        (1000, 0, 'max_epochs=0.0 must be positive and finite'),
        (1000, math.nan, 'max_epochs=nan must be positive and finite'),
    ],
)
def test_unimax_rejects_bad_settings(total_tokens, max_epochs, message):
  with _raises(message):
    mixture.unimax_weights({'deu_Latn': 10}, total_tokens, max_epochs, field=FIELD)


# --- group shares --------------------------------------------------------------

_COUNTS = {'eng_Latn': 1000, 'deu_Latn': 600, 'fra_Latn': 300, 'gle_Latn': 100}
_ENGLISH_AND_REST = {'english': ['eng_Latn'], 'rest': '*'}


def test_group_shares_split_each_group_by_natural_counts():
  # rest = deu 600 : fra 300 : gle 100 of 0.5.
  weights = mixture.group_share_weights(
      _COUNTS, _ENGLISH_AND_REST, {'english': 0.5, 'rest': 0.5}, field=FIELD
  )
  assert weights == pytest.approx(
      {'deu_Latn': 0.3, 'eng_Latn': 0.5, 'fra_Latn': 0.15, 'gle_Latn': 0.05}
  )


def test_group_shares_floor_takes_from_the_others_in_proportion():
  # Before the floor: eng .5, deu .3, fra .15, gle .05. gle goes up to .1;
  # the others (.95 together) shrink to .9, i.e. by a factor .9/.95:
  # eng .5*.9/.95 = 9/19, deu .3*.9/.95 = 27/95, fra .15*.9/.95 = 27/190.
  weights = mixture.group_share_weights(
      _COUNTS,
      _ENGLISH_AND_REST,
      {'english': 0.5, 'rest': 0.5},
      min_share=0.1,
      field=FIELD,
  )
  assert weights == pytest.approx(
      {'deu_Latn': 27 / 95, 'eng_Latn': 9 / 19, 'fra_Latn': 27 / 190, 'gle_Latn': 0.1}
  )


def test_group_shares_floor_cascades():
  # One language per group: .7, .2, .06, .04 with a floor of .18.
  # Round 1: fra, gle go to .18; eng, deu share .64: deu .2*.64/.9 = .142 < .18.
  # Round 2: deu goes to .18 too; eng keeps 1 - 3*.18 = .46.
  weights = mixture.group_share_weights(
      _COUNTS,
      {'e': 'eng_Latn', 'd': 'deu_Latn', 'f': 'fra_Latn', 'g': 'gle_Latn'},
      {'e': 0.7, 'd': 0.2, 'f': 0.06, 'g': 0.04},
      min_share=0.18,
      field=FIELD,
  )
  assert weights == pytest.approx(
      {'deu_Latn': 0.18, 'eng_Latn': 0.46, 'fra_Latn': 0.18, 'gle_Latn': 0.18}
  )


def test_group_shares_with_a_temperature_inside_groups():
  # rest at T=2: sqrt(400) : sqrt(100) = 2 : 1 of 0.4.
  weights = mixture.group_share_weights(
      {'eng_Latn': 1e6, 'deu_Latn': 400, 'gle_Latn': 100},
      {'english': 'en', 'rest': '*'},
      {'english': 0.6, 'rest': 0.4},
      within_group=2,
      field=FIELD,
  )
  assert weights == pytest.approx({'deu_Latn': 0.4 * 2 / 3, 'eng_Latn': 0.6, 'gle_Latn': 0.4 / 3})


def test_group_shares_accept_comma_separated_groups_and_zero_share_groups():
  weights = mixture.group_share_weights(
      {'deu_Latn': 3, 'fra_Latn': 1, 'gle_Latn': 0},
      {'big': 'de,fr', 'irish': ['ga']},
      {'big': 1.0, 'irish': 0.0},
      field=FIELD,
  )
  assert weights == pytest.approx({'deu_Latn': 0.75, 'fra_Latn': 0.25, 'gle_Latn': 0.0})


@pytest.mark.parametrize('seed', range(5))
def test_group_shares_invariants(seed):
  rng = np.random.default_rng(seed)
  tags = [lang.tag for lang in LANGUAGES]
  counts = dict(zip(tags, 10 ** rng.uniform(3, 10, len(tags))))
  groups = {'a': tags[:3], 'b': tags[3:10], 'rest': '*'}
  shares = dict(zip(groups, rng.dirichlet([1, 1, 1])))
  min_share = rng.uniform(0, 1 / len(tags))
  weights = mixture.group_share_weights(
      counts, groups, shares, min_share, within_group=rng.uniform(1, 5), field=FIELD
  )
  assert sum(weights.values()) == pytest.approx(1, abs=1e-12)
  assert min(weights.values()) >= min_share * (1 - 1e-12)
  unfloored = mixture.group_share_weights(counts, groups, shares, field=FIELD)
  assert sum(unfloored[t] for t in tags[:3]) == pytest.approx(shares['a'])
  assert sum(unfloored[t] for t in tags[10:]) == pytest.approx(shares['rest'])


def test_group_shares_tolerate_rounded_shares():
  weights = mixture.group_share_weights(
      _COUNTS, _ENGLISH_AND_REST, {'english': 0.3333333, 'rest': 0.6666668}, field=FIELD
  )
  assert sum(weights.values()) == pytest.approx(1, abs=1e-15)


@pytest.mark.parametrize(
    'counts, groups, shares, kwargs, message',
    [
        (_COUNTS, _ENGLISH_AND_REST, {'english': 0.5, 'rest': 0.4}, {}, 'shares sum to 0.9, not 1'),
        (
            _COUNTS,
            _ENGLISH_AND_REST,
            {'english': 1.0},
            {},
            "shares are for groups ['english'] but the groups are ['english', 'rest']",
        ),
        (
            _COUNTS,
            _ENGLISH_AND_REST,
            {'english': 1.5, 'rest': -0.5},
            {},
            "shares['rest']=-0.5 must be >= 0",
        ),
        (
            _COUNTS,
            _ENGLISH_AND_REST,
            {'english': 0.5, 'rest': 0.5},
            {'min_share': 0.3},
            'min_share=0.3 for 4 languages asks for 1.2 of the mixture',
        ),
        (
            _COUNTS,
            _ENGLISH_AND_REST,
            {'english': 0.5, 'rest': 0.5},
            {'min_share': -0.1},
            'min_share=-0.1 for 4 languages',
        ),
        (
            _COUNTS,
            {'english': ['eng_Latn'], 'more': ['en', 'deu_Latn'], 'rest': '*'},
            {'english': 0.5, 'more': 0.2, 'rest': 0.3},
            {},
            "eng_Latn is listed twice (groups 'english' and 'more')",
        ),
        (
            _COUNTS,
            {'english': ['eng_Latn'], 'x': '*', 'y': '*'},
            {'english': 1, 'x': 0, 'y': 0},
            {},
            "groups 'x' and 'y' are both '*'",
        ),
        (
            _COUNTS,
            {'english': ['eng_Latn', 'mlt_Latn'], 'rest': '*'},
            {'english': 0.5, 'rest': 0.5},
            {},
            'groups name mlt_Latn, which have no data',
        ),
        (
            _COUNTS,
            {'english': ['eng_Latn'], 'german': ['deu_Latn']},
            {'english': 0.5, 'german': 0.5},
            {},
            'fra_Latn, gle_Latn have data but are in no group',
        ),
        (
            _COUNTS,
            {'english': ['eng_Latn'], 'rest': ['engl_Latn']},
            {'english': 0.5, 'rest': 0.5},
            {},
            "Did you mean 'eng_Latn'?",
        ),
        (
            {'eng_Latn': 100, 'gle_Latn': 0},
            {'english': ['eng_Latn'], 'irish': ['gle_Latn']},
            {'english': 0.5, 'irish': 0.5},
            {},
            "group 'irish' has share 0.5 but its languages (gle_Latn) have no tokens",
        ),
        (
            {'eng_Latn': 100},
            _ENGLISH_AND_REST,
            {'english': 0.5, 'rest': 0.5},
            {},
            "group 'rest' has share 0.5 but its languages (none) have no tokens",
        ),
        (
            {'eng_Latn': 100, 'gle_Latn': 0},
            {'english': ['eng_Latn'], 'irish': ['gle_Latn']},
            {'english': 1, 'irish': 0},
            {'min_share': 0.1},
            'min_share=0.1 cannot be met by gle_Latn, which have no tokens',
        ),
        (
            _COUNTS,
            _ENGLISH_AND_REST,
            {'english': 0.5, 'rest': 0.5},
            {'within_group': 'flat'},
            "within_group='flat' must be 'natural' or a positive temperature",
        ),
        (
            _COUNTS,
            _ENGLISH_AND_REST,
            {'english': 0.5, 'rest': 0.5},
            {'within_group': 0},
            "within_group=0 must be 'natural' or a positive temperature",
        ),
    ],
)
def test_group_shares_reject_infeasible_settings(counts, groups, shares, kwargs, message):
  with _raises(message):
    mixture.group_share_weights(counts, groups, shares, field=FIELD, **kwargs)


# --- schedules -----------------------------------------------------------------


def _two_stages():
  return mixture.MixtureSchedule(
      [(0, {'deu_Latn': 1, 'fra_Latn': 1}), (90_000, {'de': 1, 'fr': 3})],
      field=FIELD,
  )


@pytest.mark.parametrize(
    'step, expected',
    [
        (0, {'deu_Latn': 0.5, 'fra_Latn': 0.5}),
        (89_999, {'deu_Latn': 0.5, 'fra_Latn': 0.5}),
        (90_000, {'deu_Latn': 0.25, 'fra_Latn': 0.75}),
        (90_001, {'deu_Latn': 0.25, 'fra_Latn': 0.75}),
        (10**12, {'deu_Latn': 0.25, 'fra_Latn': 0.75}),
    ],
)
def test_schedule_switches_at_stage_starts(step, expected):
  assert _two_stages().weights_at(step) == expected


def test_schedule_with_three_stages_and_a_language_sitting_one_out():
  schedule = mixture.MixtureSchedule(
      [
          (0, {'deu_Latn': 1, 'gle_Latn': 0}),
          (np.int64(10), {'deu_Latn': 1, 'gle_Latn': 1}),
          (20, {'deu_Latn': 0, 'gle_Latn': 1}),
      ],
      field=FIELD,
  )
  assert schedule.languages == ('deu_Latn', 'gle_Latn')
  assert [schedule.weights_at(s)['gle_Latn'] for s in (9, 10, 19, 20)] == [0, 0.5, 0.5, 1]
  assert [start for start, _ in schedule.stages] == [0, 10, 20]


def test_schedule_hands_out_copies():
  schedule = _two_stages()
  schedule.weights_at(0)['deu_Latn'] = 99
  assert schedule.weights_at(0)['deu_Latn'] == 0.5


def test_schedule_rejects_negative_steps():
  with pytest.raises(ValueError, match='step=-1 must be >= 0'):
    _two_stages().weights_at(-1)


@pytest.mark.parametrize(
    'stages, message',
    [
        ([], 'needs at least one stage'),
        ([(5, {'deu_Latn': 1})], 'the first stage starts at step 5; it must start at 0'),
        ([(0, {'deu_Latn': 1}), (0, {'deu_Latn': 1})], 'step 0 follows step 0'),
        (
            [(0, {'deu_Latn': 1}), (9, {'deu_Latn': 1}), (5, {'deu_Latn': 1})],
            'step 5 follows step 9',
        ),
        ([(0, {'deu_Latn': 1}), (1.5, {'deu_Latn': 1})], 'stage start 1.5 is not an integer'),
        (
            [(0, {'deu_Latn': 1, 'fra_Latn': 1}), (9, {'deu_Latn': 1, 'gle_Latn': 3})],
            'the stage at step 9 lacks fra_Latn and adds gle_Latn compared with step 0',
        ),
        (
            [(0, {'deu_Latn': 1, 'fra_Latn': 1}), (9, {'deu_Latn': 1})],
            'the stage at step 9 lacks fra_Latn and adds none',
        ),
        (
            [(0, {'deu_Latn': 1}), (9, {'deu_Latn': -1})],
            'deu_Latn=-1.0 in the stage at step 9 must be finite and >= 0',
        ),
        (
            [(0, {'deu_Latn': 1}), (9, {'deu_Latn': 0})],
            'the weights in the stage at step 9 sum to 0.0',
        ),
    ],
)
def test_schedule_rejects_bad_stages(stages, message):
  with _raises(message):
    mixture.MixtureSchedule(stages, field=FIELD)


# --- strings -------------------------------------------------------------------


def test_parse_weights():
  assert mixture.parse_weights('deu_Latn=0.3,fra_Latn=0.2', field=FIELD) == {
      'deu_Latn': 0.3,
      'fra_Latn': 0.2,
  }
  assert mixture.parse_weights(' de = 3 , FR=1_000 ', field=FIELD) == {
      'deu_Latn': 3.0,
      'fra_Latn': 1000.0,
  }


def test_parse_stages():
  stages = mixture.parse_stages('0:deu_Latn=1,fra_Latn=1;900:deu_Latn=1,gle_Latn=3', field=FIELD)
  assert stages == [
      (0, {'deu_Latn': 1.0, 'fra_Latn': 1.0}),
      (900, {'deu_Latn': 1.0, 'gle_Latn': 3.0}),
  ]
  # The stages name different languages: the schedule wants explicit zeros.
  with _raises('lacks fra_Latn and adds gle_Latn'):
    mixture.MixtureSchedule(stages, field=FIELD)
  schedule = mixture.MixtureSchedule(
      mixture.parse_stages(
          '0:deu_Latn=1,fra_Latn=1,gle_Latn=0; 90_000:deu_Latn=1,fra_Latn=0,gle_Latn=3',
          field=FIELD,
      ),
      field=FIELD,
  )
  assert schedule.weights_at(90_000) == {'deu_Latn': 0.25, 'fra_Latn': 0.0, 'gle_Latn': 0.75}


def test_weights_round_trip():
  weights = {'deu_Latn': 1 / 3, 'fra_Latn': 1e-9, 'gle_Latn': 2.0, 'mlt_Latn': 0.0}
  text = mixture.format_weights(weights)
  assert text == 'deu_Latn=0.3333333333333333,fra_Latn=1e-09,gle_Latn=2.0,mlt_Latn=0.0'
  assert mixture.parse_weights(text, field=FIELD) == weights


def test_stages_round_trip():
  schedule = mixture.MixtureSchedule(
      [(0, {'deu_Latn': 1, 'fra_Latn': 2}), (7, {'deu_Latn': 3, 'fra_Latn': 0})],
      field=FIELD,
  )
  text = mixture.format_stages(schedule.stages)
  assert text == (
      '0:deu_Latn=0.3333333333333333,fra_Latn=0.6666666666666666;7:deu_Latn=1.0,fra_Latn=0.0'
  )
  reparsed = mixture.MixtureSchedule(mixture.parse_stages(text, field=FIELD), field=FIELD)
  assert reparsed.stages == schedule.stages


@pytest.mark.parametrize(
    'text, message',
    [
        ('deu_Latn', "expected TAG=WEIGHT, got 'deu_Latn'"),
        ('', "expected TAG=WEIGHT, got ''"),
        ('deu_Latn=0.3,', "expected TAG=WEIGHT, got ''"),
        ('=0.3', "expected TAG=WEIGHT, got '=0.3'"),
        ('deu_Latn=0.3,fra_Latn=lots', "weight 'lots' in 'fra_Latn=lots' is not a number"),
        ('fre_Latm=1', "names script 'Latm', but euro_lm has French only as 'fra_Latn'"),
        ('frq=1', "Did you mean 'fra_Latn'?"),
        ('de=1,deu_Latn=2', "deu_Latn is given twice: 'deu_Latn=2'"),
    ],
)
def test_parse_weights_errors_name_the_fragment(text, message):
  with _raises(message):
    mixture.parse_weights(text, field=FIELD)


@pytest.mark.parametrize(
    'text, message',
    [
        ('0 deu_Latn=1', "expected STEP:TAG=WEIGHT,... , got stage '0 deu_Latn=1'"),
        ('0:deu_Latn=1;x:deu_Latn=1', "step 'x' of stage 'x:deu_Latn=1' is not an integer"),
        ('0:deu_Latn=1;1e5:deu_Latn=1', "step '1e5' of stage '1e5:deu_Latn=1' is not an integer"),
        (
            '0:deu_Latn=1;900:deu_Latn',
            "expected TAG=WEIGHT, got 'deu_Latn' in stage '900:deu_Latn'",
        ),
        (
            '0:deu_Latn=1;900:deu_Latn=x',
            "weight 'x' in 'deu_Latn=x' in stage '900:deu_Latn=x' is not a number",
        ),
    ],
)
def test_parse_stages_errors_name_the_fragment(text, message):
  with _raises(message):
    mixture.parse_stages(text, field=FIELD)


# --- realised shares -----------------------------------------------------------


def test_realised_shares():
  shares = mixture.realised_shares({'fra_Latn': np.int64(10), 'deu_Latn': np.int64(30)})
  assert shares == {'deu_Latn': 0.75, 'fra_Latn': 0.25}
  assert all(type(s) is float for s in shares.values())
  assert mixture.realised_shares({'deu_Latn': 0, 'fra_Latn': 0}) == {
      'deu_Latn': 0.0,
      'fra_Latn': 0.0,
  }
