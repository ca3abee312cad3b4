"""The shared text normalizer (training, WER and serving all use it)."""

from __future__ import annotations

import pytest

from pipeline.data.text import CHARSET, DIGIT_WORDS, find_out_of_charset, normalize_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("four one five", "four one five"),
        ("  Four   ONE\tfive\n", "four one five"),
        ("415", "four one five"),
        ("7", "seven"),
        ("call 415-7, now!", "call four one five seven now"),
        ("3.5", "three five"),
        ("a1b", "a one b"),
        ("Ｆｏｕｒ ４", "four four"),  # NFKC folds full-width forms
        ("٤٢", "four two"),  # any Unicode decimal digit
        ("Don't", "don't"),
        ("it\u2019s", "it's"),  # typographic apostrophe folded
        ("'quoted'", "quoted"),  # apostrophes at word edges are punctuation
        ("rock 'n' roll", "rock n roll"),
        ("?!...", ""),
        ("", ""),
        ("zero\u200bnine", "zero nine"),  # format characters are separators
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_normalize_text_is_idempotent() -> None:
    for raw in ["Call 415, NOW!", "Don't stop", "  ", "Ｆｏｕｒ ４ ٤"]:
        once = normalize_text(raw)
        assert normalize_text(once) == once


def test_digit_words_fit_the_charset() -> None:
    assert len(DIGIT_WORDS) == 10
    for word in DIGIT_WORDS:
        assert not find_out_of_charset(word)
    assert CHARSET[0] == " " and len(set(CHARSET)) == len(CHARSET)


def test_find_out_of_charset_names_foreign_letters() -> None:
    assert find_out_of_charset(normalize_text("Café 4")) == {"é"}
