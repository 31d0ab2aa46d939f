"""Captions as the language is written: a capital first letter where the script has case, punctuation
attached the way the language writes it.

    written_form("a man 's dog sits on a table .", "en")  # "A man's dog sits on a table."
    written_form("un chien court !", "fr")                # "Un chien court !" (U+202F before "!")
    written_form("一只狗 在 草地上 。", "zh")                # "一只狗在草地上。"

Only spaces and the first letter's case change, never a word or a piece of
punctuation, so the tokens BLEU and CIDEr-D score (`evaluate.bleu_tokenize`:
case-folded, punctuation a boundary) are the same before and after (tested on
every Flickr8k caption); only the Turkish dotted capital İ folds otherwise, as
the references' own İ does. A full stop the model did not write is not added.

The decoder learns captions in `training_form`: punctuation attached, and the
first word in the case it has inside captions ("a", but "Paris", and German
"Hund"), so "A" and "a" share their pieces and `written_form` puts the capital
back (a truecaser, as in machine translation).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from toolkit.evaluate import INVISIBLE, base_lang

# Scripts of these are written without spaces between words: no space between two of their characters.
_UNSPACED = frozenset({"zh", "ja", "yue"})
# Scripts without case, where a Latin word that opens a caption ("iPhone") keeps its own.
_CASELESS = _UNSPACED | {"th", "lo", "km", "my"}
NNBSP = "\u202f"  # French sets "!", "?", ";" and ":" off by a narrow no-break space, as CLDR and Le Monde do

# ".", ",", ";", ":", "!", "?" close up to the word before, where a word does not follow (".NET", "10:30" stay).
_SPACE_BEFORE_STOP = re.compile(r"\s+([.,;:!?…]+)(?!\w)")
_SPACE_BEFORE_FRENCH_STOP = re.compile(r"\s+([.,…]+)(?!\w)")
_FRENCH_SPACED = re.compile(r"(?<=\S)\s*([!?;:]+)(?!\w)")
_SPACE_INSIDE_BRACKETS = (re.compile(r"([(\[{¿¡])\s+"), re.compile(r"\s+([)\]}])"))
# English clitics split off by Flickr8k's tokenizer ("man 's"); "do n't" stays apart, as BLEU's tokens would change.
_ENGLISH_CLITIC = re.compile(r"(?<=\w)\s+(['’](?:s|re|ve|ll|d|m))\b", re.IGNORECASE)
_UPPER = {"tr": {"i": "İ"}, "az": {"i": "İ"}}  # Turkish and Azerbaijani dotted i


def attach_punctuation(text: str, lang: str) -> str:
    """`text` with its spaces as `lang` writes them; case untouched.

    >>> attach_punctuation('a sign that says " stop . " ( # 7 )', "en")
    'a sign that says "stop." (# 7)'
    """
    lang = base_lang(lang)
    text = " ".join(text.translate(INVISIBLE).split())  # zero-width spaces too, as BLEU reads them
    if lang == "fr":
        text = _FRENCH_SPACED.sub(NNBSP + r"\1", _SPACE_BEFORE_FRENCH_STOP.sub(r"\1", text))
    else:
        text = _SPACE_BEFORE_STOP.sub(r"\1", text)
    opening, closing = _SPACE_INSIDE_BRACKETS
    text = closing.sub(r"\1", opening.sub(r"\1", text))
    if lang == "en":
        text = _ENGLISH_CLITIC.sub(r"\1", text)
    text = _pair_straight_quotes(text)
    if lang in _UNSPACED:
        # No space is first or last after the join above, so both neighbours exist.
        text = "".join(ch for i, ch in enumerate(text) if ch != " " or not (_wide(text[i - 1]) or _wide(text[i + 1])))
    return text


def _pair_straight_quotes(text: str) -> str:
    """'" stop "' -> '"stop"': odd quotes open (no space after), even ones close (no space before); a last unpaired one stays."""
    parts = text.split('"')
    for q in range(len(parts) - 1 - (len(parts) - 1) % 2):
        if q % 2 == 0:
            parts[q + 1] = parts[q + 1].lstrip(" ")
        else:
            parts[q] = parts[q].rstrip(" ")
    return '"'.join(parts)


def _wide(ch: str) -> bool:
    """Whether `ch` is one of the characters written without spaces (CJK, kana, full-width punctuation).

    Full-width Latin letters and digits ("Ａ", "１") are words, as their NFKC forms are for BLEU: not wide.
    """
    return unicodedata.east_asian_width(unicodedata.normalize("NFKC", ch)[:1] or ch) in ("W", "F")


def capitalise(text: str, lang: str) -> str:
    """`text` with its first letter or digit in upper case where it has case: "¿qué?" -> "¿Qué?", "2 dogs" unchanged."""
    lang = base_lang(lang)
    if lang in _CASELESS:
        return text
    for i, ch in enumerate(text):
        if ch.isalnum():
            if lang == "nl" and text[i : i + 2] == "ij":
                return text[:i] + "IJ" + text[i + 2 :]
            up = _UPPER.get(lang, {}).get(ch) or ch.upper()
            return text[:i] + up + text[i + 1 :] if len(up) == 1 else text  # "ß" has no one-letter capital
    return text


def written_form(text: str, lang: str) -> str:
    """A caption as `lang` writes it: punctuation attached (`attach_punctuation`), first letter capitalised.

    Idempotent: `written_form(written_form(x, l), l) == written_form(x, l)`.
    """
    return capitalise(attach_punctuation(text, lang), lang)


_FIRST_WORD = re.compile(r"^(\W*)(\w+)")


def learn_casing(texts: Iterable[str]) -> dict[str, str]:
    """How each word is written where it is not a caption's first: case-folded word -> its most frequent spelling.

    >>> learn_casing(["A dog in Paris", "Paris has a dog"])
    {'dog': 'dog', 'in': 'in', 'paris': 'Paris', 'has': 'has', 'a': 'a'}
    """
    seen: dict[str, Counter] = defaultdict(Counter)
    for text in texts:
        for word in re.findall(r"\w+", text)[1:]:
            seen[word.casefold()][word] += 1
    return {key: forms.most_common(1)[0][0] for key, forms in seen.items()}


def training_form(text: str, lang: str, casing: Mapping[str, str]) -> str:
    """`text` as the decoder learns it: punctuation attached, the first word as `casing` (`learn_casing`) spells it.

    >>> training_form("A man 's dog .", "en", {"a": "a"})
    "a man's dog."
    """
    text = attach_punctuation(text, lang)
    m = _FIRST_WORD.match(text)
    if not m:
        return text
    inside = casing.get(m.group(2).casefold())
    if inside is None or len(inside) != len(m.group(2)):  # never seen past the first word: keep it as written
        return text
    return m.group(1) + inside + text[m.end() :]
