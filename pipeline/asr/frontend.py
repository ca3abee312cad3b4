"""The log-mel front end: one definition shared by feature extraction, training and export.

``LogMel`` is a TorchScript-able module (torchaudio ``MelSpectrogram`` then ``log(x + 1e-6)``)
so the exported model computes exactly the features the cached shards hold.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torchaudio

from pipeline.config import FeatureConfig

LOG_FLOOR = 1e-6


def frontend_settings(features: FeatureConfig, sample_rate: int) -> dict[str, Any]:
    """The settings that determine the features (and so the cache key)."""
    win = int(round(features.win_ms * sample_rate / 1000))
    hop = int(round(features.hop_ms * sample_rate / 1000))
    n_fft = 1
    while n_fft < win:
        n_fft *= 2
    return {
        "sample_rate": int(sample_rate),
        "n_mels": int(features.n_mels),
        "win_length": win,
        "hop_length": hop,
        "n_fft": n_fft,
        "log_floor": LOG_FLOOR,
        "kind": "torchaudio.MelSpectrogram+log",
    }


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class LogMel(torch.nn.Module):
    """waveform [B, S] (or [S]) -> log-mel [B, frames, n_mels]."""

    def __init__(self, settings: dict[str, Any]):
        super().__init__()
        self.hop_length = int(settings["hop_length"])
        self.log_floor = float(settings.get("log_floor", LOG_FLOOR))
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=int(settings["sample_rate"]),
            n_fft=int(settings["n_fft"]),
            win_length=int(settings["win_length"]),
            hop_length=self.hop_length,
            n_mels=int(settings["n_mels"]),
            center=True,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(wave) + self.log_floor).transpose(-1, -2)

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        return torch.div(num_samples, self.hop_length, rounding_mode="floor") + 1


def build_frontend(features: FeatureConfig, sample_rate: int) -> LogMel:
    return LogMel(frontend_settings(features, sample_rate))
