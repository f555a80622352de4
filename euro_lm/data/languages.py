"""The one table of European languages euro_lm knows, and alias folding.

Tags are ISO 639-3 language + ISO 15924 script (`ces_Latn`, `ell_Grek`), the
form FLORES/NLLB use. Every other module asks this table; none keeps a list.

A language has one tag per script it is listed in. Serbian is `srp_Cyrl` (its
official script and Django's `sr` catalog) and `srp_Latn`; a code without a script
(`sr`, `srp`) folds to the language's first tag in the table, and a code naming a
script the table does not list for it (`de_Cyrl`) is rejected rather than folded
into the wrong script.

The table covers the languages of Europe: the EU's official ones, the other
national and regional languages with their ISO 639-1 codes where they have one,
and minority languages by their ISO 639-3 code. Macrolanguages keep the
macrolanguage code (`est`, `sqi`, `aze`), as the first entries did.

Besides languages, data can be tagged with a domain that is not a natural
language (`DOMAINS`: source code, mathematics), so mixtures can give it a share
of its own ('code=0.1;*=0.9').
"""

import dataclasses
import difflib
import re


@dataclasses.dataclass(frozen=True)
class Language:
  """A language: canonical tag, English name, ISO 639-1 code, EU status."""

  tag: str
  name: str
  iso639_1: str
  eu_official: bool
  # ISO 639-2/B code where it differs from the 639-3 code (`ger` for `deu`).
  iso639_2b: str = ''

  @property
  def iso639_3(self) -> str:
    return self.tag.split('_')[0]

  @property
  def script(self) -> str:
    return self.tag.split('_')[1]


LANGUAGES: tuple[Language, ...] = (
    # The 24 official languages of the European Union.
    Language('bul_Cyrl', 'Bulgarian', 'bg', True),
    Language('ces_Latn', 'Czech', 'cs', True, 'cze'),
    Language('dan_Latn', 'Danish', 'da', True),
    Language('deu_Latn', 'German', 'de', True, 'ger'),
    Language('ell_Grek', 'Greek', 'el', True, 'gre'),
    Language('eng_Latn', 'English', 'en', True),
    Language('est_Latn', 'Estonian', 'et', True),
    Language('fin_Latn', 'Finnish', 'fi', True),
    Language('fra_Latn', 'French', 'fr', True, 'fre'),
    Language('gle_Latn', 'Irish', 'ga', True),
    Language('hrv_Latn', 'Croatian', 'hr', True),
    Language('hun_Latn', 'Hungarian', 'hu', True),
    Language('ita_Latn', 'Italian', 'it', True),
    Language('lav_Latn', 'Latvian', 'lv', True),
    Language('lit_Latn', 'Lithuanian', 'lt', True),
    Language('mlt_Latn', 'Maltese', 'mt', True),
    Language('nld_Latn', 'Dutch', 'nl', True, 'dut'),
    Language('pol_Latn', 'Polish', 'pl', True),
    Language('por_Latn', 'Portuguese', 'pt', True),
    Language('ron_Latn', 'Romanian', 'ro', True, 'rum'),
    Language('slk_Latn', 'Slovak', 'sk', True, 'slo'),
    Language('slv_Latn', 'Slovenian', 'sl', True),
    Language('spa_Latn', 'Spanish', 'es', True),
    Language('swe_Latn', 'Swedish', 'sv', True),
    # Other European languages.
    Language('nob_Latn', 'Norwegian Bokmål', 'nb', False),
    Language('nno_Latn', 'Norwegian Nynorsk', 'nn', False),
    Language('isl_Latn', 'Icelandic', 'is', False, 'ice'),
    Language('eus_Latn', 'Basque', 'eu', False, 'baq'),
    Language('cat_Latn', 'Catalan', 'ca', False),
    Language('glg_Latn', 'Galician', 'gl', False),
    Language('ukr_Cyrl', 'Ukrainian', 'uk', False),
    Language('srp_Cyrl', 'Serbian', 'sr', False),
    Language('bos_Latn', 'Bosnian', 'bs', False),
    Language('mkd_Cyrl', 'Macedonian', 'mk', False, 'mac'),
    Language('sqi_Latn', 'Albanian', 'sq', False, 'alb'),
    Language('kat_Geor', 'Georgian', 'ka', False, 'geo'),
    Language('tur_Latn', 'Turkish', 'tr', False),
    # Added with the tokenizer evaluation (issue 25): the rest of Europe.
    Language('srp_Latn', 'Serbian (Latin)', 'sr', False),
    Language('rus_Cyrl', 'Russian', 'ru', False),
    Language('bel_Cyrl', 'Belarusian', 'be', False),
    Language('rue_Cyrl', 'Rusyn', '', False),
    Language('cnr_Latn', 'Montenegrin', '', False),
    Language('cym_Latn', 'Welsh', 'cy', False, 'wel'),
    Language('bre_Latn', 'Breton', 'br', False),
    Language('gla_Latn', 'Scottish Gaelic', 'gd', False),
    Language('glv_Latn', 'Manx', 'gv', False),
    Language('cor_Latn', 'Cornish', 'kw', False),
    Language('ltz_Latn', 'Luxembourgish', 'lb', False),
    Language('fao_Latn', 'Faroese', 'fo', False),
    Language('roh_Latn', 'Romansh', 'rm', False),
    Language('fry_Latn', 'West Frisian', 'fy', False),
    Language('frr_Latn', 'North Frisian', '', False),
    Language('stq_Latn', 'Saterland Frisian', '', False),
    Language('nds_Latn', 'Low German', '', False),
    Language('lim_Latn', 'Limburgish', 'li', False),
    Language('gsw_Latn', 'Alemannic (Swiss German)', '', False),
    Language('ltg_Latn', 'Latgalian', '', False),
    Language('sgs_Latn', 'Samogitian', '', False),
    Language('vro_Latn', 'Võro', '', False),
    Language('oci_Latn', 'Occitan', 'oc', False),
    Language('cos_Latn', 'Corsican', 'co', False),
    Language('srd_Latn', 'Sardinian', 'sc', False),
    Language('fur_Latn', 'Friulian', '', False),
    Language('lld_Latn', 'Ladin', '', False),
    Language('vec_Latn', 'Venetian', '', False),
    Language('scn_Latn', 'Sicilian', '', False),
    Language('lij_Latn', 'Ligurian', '', False),
    Language('lmo_Latn', 'Lombard', '', False),
    Language('pms_Latn', 'Piedmontese', '', False),
    Language('nap_Latn', 'Neapolitan', '', False),
    Language('ast_Latn', 'Asturian', '', False),
    Language('arg_Latn', 'Aragonese', 'an', False),
    Language('ext_Latn', 'Extremaduran', '', False),
    Language('mwl_Latn', 'Mirandese', '', False),
    Language('frp_Latn', 'Franco-Provençal', '', False),
    Language('wln_Latn', 'Walloon', 'wa', False),
    Language('pcd_Latn', 'Picard', '', False),
    Language('rup_Latn', 'Aromanian', '', False),
    Language('hsb_Latn', 'Upper Sorbian', '', False),
    Language('dsb_Latn', 'Lower Sorbian', '', False),
    Language('csb_Latn', 'Kashubian', '', False),
    Language('szl_Latn', 'Silesian', '', False),
    Language('sme_Latn', 'Northern Sami', 'se', False),
    Language('sma_Latn', 'Southern Sami', '', False),
    Language('smj_Latn', 'Lule Sami', '', False),
    Language('smn_Latn', 'Inari Sami', '', False),
    Language('sms_Latn', 'Skolt Sami', '', False),
    Language('krl_Latn', 'Karelian', '', False),
    Language('vep_Latn', 'Veps', '', False),
    Language('liv_Latn', 'Livonian', '', False),
    Language('hye_Armn', 'Armenian', 'hy', False, 'arm'),
    Language('aze_Latn', 'Azerbaijani', 'az', False),
    Language('tat_Cyrl', 'Tatar', 'tt', False),
    Language('crh_Latn', 'Crimean Tatar', '', False),
    Language('bak_Cyrl', 'Bashkir', 'ba', False),
    Language('chv_Cyrl', 'Chuvash', 'cv', False),
    Language('kom_Cyrl', 'Komi', 'kv', False),
    Language('udm_Cyrl', 'Udmurt', '', False),
    Language('chm_Cyrl', 'Mari', '', False),
    Language('myv_Cyrl', 'Erzya', '', False),
    Language('mdf_Cyrl', 'Moksha', '', False),
    Language('krc_Cyrl', 'Karachay-Balkar', '', False),
    Language('oss_Cyrl', 'Ossetian', 'os', False),
    Language('che_Cyrl', 'Chechen', 'ce', False),
    Language('ava_Cyrl', 'Avar', 'av', False),
    Language('xal_Cyrl', 'Kalmyk', '', False),
    Language('gag_Latn', 'Gagauz', '', False),
    Language('rom_Latn', 'Romani', '', False),
    Language('yid_Hebr', 'Yiddish', 'yi', False),
    Language('lad_Latn', 'Ladino', '', False),
    Language('lat_Latn', 'Latin', 'la', False),
)

EU_OFFICIAL: tuple[str, ...] = tuple(lang.tag for lang in LANGUAGES if lang.eu_official)

# Code -> the language's first entry; (code, script) -> the entry in that script.
_BY_CODE: dict[str, Language] = {}
_BY_CODE_AND_SCRIPT: dict[tuple[str, str], Language] = {}
for _lang in LANGUAGES:
  for _code in (_lang.iso639_1, _lang.iso639_3, _lang.iso639_2b):
    if _code:
      _BY_CODE.setdefault(_code, _lang)
      _BY_CODE_AND_SCRIPT[_code, _lang.script.lower()] = _lang


# Non-language data tags; they fold only to themselves (any case).
DOMAINS = ('code', 'math')


def canonical_language(code: str) -> str:
  """Folds a language code (or a domain in DOMAINS) to its canonical tag.

  Accepts ISO 639-1 (`cs`), 639-2/B (`cze`), 639-3 (`ces`), the tag itself
  (`ces_Latn`) and locale forms (`pt_BR`, `pt-BR`, `sr-Cyrl-RS`), in any case.
  A region is ignored; a script must match the table's.

  Raises:
    ValueError: the code names no language in the table, or the wrong script.
  """
  if code.strip().lower() in DOMAINS:
    return code.strip().lower()
  parts = code.strip().replace('-', '_').split('_')
  language_entry = _BY_CODE.get(parts[0].lower())
  if language_entry is None:
    raise ValueError(
        f'Unknown language code {code!r}. Known languages are the tags (or'
        ' their ISO 639 codes) in euro_lm.data.languages.LANGUAGES; list them'
        ' with `python -c "from euro_lm.data import languages;'
        ' print(languages.known_tags())"`.'
    )
  # Subtags after the language: a 4-letter script, or a region (ignored).
  scripts = [p for p in parts[1:] if len(p) == 4 and p.isalpha()]
  for script in scripts:
    in_script = _BY_CODE_AND_SCRIPT.get((parts[0].lower(), script.lower()))
    if in_script is None:
      tags = [l.tag for l in LANGUAGES if l.iso639_3 == language_entry.iso639_3]
      raise ValueError(
          f'Language code {code!r} names script {script!r}, but euro_lm has'
          f' {language_entry.name} only as {" or ".join(map(repr, tags))}.'
      )
    language_entry = in_script
  return language_entry.tag


def resolve_language(code: str) -> str:
  """`canonical_language`, suggesting the closest tag on failure.

  Raises:
    ValueError: `code` names no known language; the message suggests one.
  """
  try:
    return canonical_language(code)
  except ValueError as e:
    # A known language in the wrong script: the message already names the tag.
    if _is_known_language(re.split('[-_]', code.strip())[0]):
      raise
    suggestion = _closest_language(code)
    if suggestion is None:
      raise
    raise ValueError(f'{e} Did you mean {suggestion.tag!r} ({suggestion.name})?') from None


def _is_known_language(code: str) -> bool:
  try:
    canonical_language(code)
  except ValueError:
    return False
  return True


def _closest_language(code: str) -> Language | None:
  by_spelling = {}
  for lang in LANGUAGES:
    spellings = (lang.tag, lang.name, lang.iso639_1, lang.iso639_3, lang.iso639_2b)
    for spelling in spellings:
      if spelling:
        by_spelling[spelling.lower()] = lang
  matches = difflib.get_close_matches(code.strip().lower(), by_spelling, n=1)
  return by_spelling[matches[0]] if matches else None


def known_tags() -> str:
  """The known tags as one comma-separated line, for messages."""
  return ', '.join([lang.tag for lang in LANGUAGES] + list(DOMAINS))
