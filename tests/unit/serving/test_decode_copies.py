"""The two self-contained greedy CTC decoders match the library's.

``pipeline/serving/handler.py`` (packaged alone into the .mar) and
``pipeline/serving/pyfunc_model.py`` (copied into each MLflow model) cannot import
``pipeline``, so each keeps its own copy of :func:`pipeline.asr.vocab.greedy_decode`.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.asr.vocab import BLANK, TOKENS, greedy_decode
from pipeline.serving.handler import ASRService
from pipeline.serving.pyfunc_model import ASRPyfunc  # importing it runs mlflow.models.set_model(): harmless here


def _batch(seed: int, vocab: int, blank: int, space: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs whose best paths have runs of repeats, blanks and spaces, and lengths shorter than the frames."""
    gen = torch.Generator().manual_seed(seed)
    batch, frames = 6, 40
    runs = torch.randint(0, vocab, (batch, frames // 4), generator=gen)
    draw = torch.rand(runs.shape, generator=gen)
    runs[draw < 0.35] = blank
    runs[(draw >= 0.35) & (draw < 0.5)] = space  # leading, trailing and repeated spaces are normalized
    best = runs.repeat_interleave(torch.randint(1, 4, (frames // 4,), generator=gen), dim=1)[:, :frames]
    logits = torch.randn(batch, best.shape[1], vocab, generator=gen)
    logits.scatter_(2, best.unsqueeze(-1), 10.0)
    lengths = torch.randint(0, best.shape[1] + 1, (batch,), generator=gen)
    lengths[0] = best.shape[1]
    return torch.log_softmax(logits, dim=-1), lengths


def _handler(tokens: list[str], blank: int) -> ASRService:
    service = ASRService()
    service.tokens, service.blank = tokens, blank
    return service


def _pyfunc(tokens: list[str], blank: int) -> ASRPyfunc:
    model = ASRPyfunc()
    model.tokens, model.blank = tokens, blank
    return model


@pytest.mark.parametrize(
    ("tokens", "blank"),
    [(list(TOKENS), BLANK), (["a", " ", "b", "<blank>", "c"], 3)],  # the real vocabulary; another blank index
)
@pytest.mark.parametrize("seed", range(5))
def test_handler_and_pyfunc_decode_like_the_library(tokens, blank, seed):
    log_probs, lengths = _batch(seed, len(tokens), blank, tokens.index(" "))
    expected = greedy_decode(log_probs, lengths, tokens, blank)
    assert any(expected), "the batch should decode to some text"
    assert _handler(tokens, blank)._ctc_decode(log_probs, lengths) == expected
    assert _pyfunc(tokens, blank)._decode(log_probs, lengths) == expected
