"""Tiny exported models with hand-set weights: deterministic WERs without any training.

* ``mute``   — head weights zeroed: every frame's argmax is the blank, every hypothesis is
  empty, WER is exactly 100 % (all deletions).
* ``babble`` — encoder and front projection zeroed so the encoder outputs its positional
  encoding; the head maps sin(position) to ``e``/space, so every utterance decodes as
  "e e e e ..." at ~4 words a second: many insertions, WER well above 100 % ("damaged").
* ``nan``    — ``mute`` with a NaN in the head's bias: every output frame is NaN, and the
  greedy decode still yields empty hypotheses (NaN ranks first at the blank), so its WER
  equals mute's: only a check of the outputs themselves tells it is damaged.
* ``random`` — random initial weights.

On the golden set, mute < babble in WER for every group, so "mute" plays the better
candidate and "babble" the worse (damaged) one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.asr.export import export_model
from pipeline.asr.frontend import frontend_settings
from pipeline.asr.model import ASRModel
from pipeline.asr.vocab import TOKENS, vocab_size
from pipeline.config import FeatureConfig, ModelConfig

TINY = ModelConfig(encoder="transformer", d_model=32, num_layers=1, attention_heads=4, ffn_mult=1, subsample_channels=8)


def tiny_model(kind: str, seed: int = 0) -> ASRModel:
    torch.manual_seed(seed)
    m = ASRModel(TINY, FeatureConfig().n_mels, vocab_size()).eval()
    with torch.no_grad():
        if kind in ("mute", "nan"):
            m.head.weight.zero_()
            m.head.bias.zero_()
            if kind == "nan":
                m.head.bias[0] = float("nan")
        elif kind == "babble":
            m.subsample.proj.weight.zero_()
            m.subsample.proj.bias.zero_()
            for layer in m.encoder.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
                layer.self_attn.out_proj.bias.zero_()
                layer.linear2.weight.zero_()
                layer.linear2.bias.zero_()
            m.head.weight.zero_()
            m.head.bias.fill_(-100.0)
            m.head.bias[0] = 0.0
            e, space = TOKENS.index("e"), TOKENS.index(" ")
            m.head.weight[e, 0], m.head.bias[e] = 10.0, -5.0
            m.head.weight[space, 0], m.head.bias[space] = -10.0, -5.0
        elif kind != "random":
            raise ValueError(f"unknown kind {kind!r}")
    return m


def export_tiny(path: str | Path, kind: str, seed: int = 0, sample_rate: int = 8000) -> Path:
    return export_model(tiny_model(kind, seed), frontend_settings(FeatureConfig(), sample_rate), path,
                        {"kind": kind, "seed": seed, "model": TINY.model_dump(mode="json")})
