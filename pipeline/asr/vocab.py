"""The CTC character vocabulary: index 0 is the blank, then the normalizer's CHARSET."""

from __future__ import annotations

from pipeline.data.text import CHARSET

BLANK = 0
TOKENS: tuple[str, ...] = ("<blank>",) + tuple(CHARSET)
_INDEX = {ch: i for i, ch in enumerate(TOKENS) if i != BLANK}


def vocab_size() -> int:
    return len(TOKENS)


def encode_text(text: str) -> list[int]:
    """Token ids of a normalized transcript; characters outside the vocabulary raise ValueError."""
    try:
        return [_INDEX[ch] for ch in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} of {text!r} is not in the vocabulary") from None


def decode_ids(ids: list[int]) -> str:
    """Greedy CTC collapse: merge repeats, drop blanks."""
    out: list[str] = []
    prev = -1
    for i in ids:
        if i != prev and i != BLANK:
            out.append(TOKENS[i])
        prev = i
    return " ".join("".join(out).split())
