"""The one text normalizer shared by training, WER scoring and serving.

Every transcript that enters the pool, every reference and hypothesis that is scored,
and every string the served model returns goes through :func:`normalize_text`, so the
three can never disagree about what a "word" is.

Rules, applied in this order:

1. Unicode NFKC (full-width and compatibility forms fold to their plain letters and
   digits, e.g. ``"Ｆｏｕｒ"`` -> ``"Four"``, ``"４"`` -> ``"4"``).
2. Lowercase.
3. Numerals are spelled out **digit by digit**, each digit becoming its own word:
   ``"415"`` -> ``"four one five"``, ``"7"`` -> ``"seven"``, ``"3.5"`` -> ``"three five"``.
   The task is spoken digit sequences (a caller reads "four one five", not "four hundred
   fifteen"), so digit-by-digit is the faithful transcription; any Unicode decimal digit
   (``Nd``, e.g. Arabic-Indic) is spelled the same way.
4. Punctuation and symbols become spaces, except an apostrophe between two letters,
   which is kept (``"don't"`` stays, ``"'quoted'"`` -> ``"quoted"``). Typographic
   apostrophes (``’``, ``ʼ``) are folded to ``'`` first.
5. Whitespace (and control characters) collapse to single spaces; the result is stripped.

The result may be empty (e.g. ``"?!"``); callers decide whether that is an error.
Letters outside ``a-z`` (``é``) are kept: :data:`CHARSET` is the model vocabulary,
and :func:`find_out_of_charset` tells which characters of a normalized string fall
outside it.
"""

from __future__ import annotations

import unicodedata

__all__ = ["CHARSET", "DIGIT_WORDS", "find_out_of_charset", "normalize_text"]

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# The characters a normalized transcript of the digit task is made of (space first).
CHARSET: str = " '" + "abcdefghijklmnopqrstuvwxyz"

_APOSTROPHES = {"\u2019": "'", "\u02bc": "'", "\u2018": "'", "\uff07": "'"}


def _spell_digits(text: str) -> str:
    out: list[str] = []
    for ch in text:
        value = unicodedata.decimal(ch, None)
        out.append(f" {DIGIT_WORDS[value]} " if value is not None else ch)
    return "".join(out)


def _strip_punctuation(text: str) -> str:
    out: list[str] = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if ch == "'":
            inside_word = 0 < i < last and text[i - 1].isalpha() and text[i + 1].isalpha()
            out.append(ch if inside_word else " ")
            continue
        category = unicodedata.category(ch)
        if category[0] in "PSZC":  # punctuation, symbols, separators, control/format
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def normalize_text(s: str) -> str:
    """Normalize a transcript: NFKC, lowercase, digits spelled one by one, punctuation stripped.

    >>> normalize_text("  Call 415,  NOW! ")
    'call four one five now'
    >>> normalize_text("Don't")
    "don't"
    """
    text = unicodedata.normalize("NFKC", s).lower()
    for typographic, plain in _APOSTROPHES.items():
        text = text.replace(typographic, plain)
    text = _spell_digits(text)
    text = _strip_punctuation(text)
    return " ".join(text.split())


def find_out_of_charset(text: str) -> set[str]:
    """Characters of ``text`` that are not in :data:`CHARSET` (empty when it fits the vocabulary)."""
    return set(text) - set(CHARSET)
