"""The CTC character vocabulary: index 0 is the blank, then the normalizer's CHARSET."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.data.text import CHARSET

if TYPE_CHECKING:
    import torch

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


def collapse(ids: Sequence[int], tokens: Sequence[str] = TOKENS, blank: int = BLANK) -> str:
    """Greedy CTC collapse of one utterance's best path: merge repeats, drop blanks.

    The library copy. ``pipeline/serving/handler.py`` (packaged alone into the .mar) and
    ``pipeline/serving/pyfunc_model.py`` (copied into each MLflow model) keep their own,
    which ``tests/unit/serving/test_decode_copies.py`` checks against this one.
    """
    out: list[str] = []
    prev = -1
    for i in ids:
        if i != prev and i != blank:
            out.append(tokens[i])
        prev = i
    return " ".join("".join(out).split())


def decode_ids(ids: Sequence[int]) -> str:
    """Greedy CTC collapse with this vocabulary."""
    return collapse(ids)


def greedy_decode(log_probs: "torch.Tensor", lengths: "torch.Tensor", tokens: Sequence[str] = TOKENS,
                  blank: int = BLANK) -> list[str]:
    """Best-path CTC decoding of a batch of (frames, vocab) log-probabilities."""
    best = log_probs.argmax(dim=-1).tolist()
    return [collapse(ids[:n], tokens, blank) for ids, n in zip(best, lengths.tolist(), strict=True)]
