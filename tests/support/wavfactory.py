"""Tiny in-memory audio files for ingest tests (numpy + soundfile, no fixtures on disk)."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import soundfile as sf


def make_audio(
    seconds: float = 1.0,
    sr: int = 8000,
    channels: int = 1,
    *,
    seed: int = 0,
    amplitude: float = 0.3,
    fmt: str = "WAV",
    subtype: str = "PCM_16",
    samples: np.ndarray | None = None,
) -> bytes:
    """Encoded audio bytes: seeded noise (distinct bytes per seed) unless ``samples`` ([frames, channels]) is given."""
    if samples is None:
        rng = np.random.default_rng(seed)
        samples = (amplitude * rng.uniform(-1.0, 1.0, size=(int(round(seconds * sr)), channels))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record(utt_id: str, audio_filepath: str, duration: float = 1.0, /, **overrides: Any) -> dict[str, Any]:
    """A valid incoming manifest record; ``overrides`` replace fields (``None`` removes one)."""
    rec: dict[str, Any] = {
        "audio_filepath": audio_filepath,
        "duration": duration,
        "text": "four one five",
        "speaker": "jackson",
        "group": "USA/neutral",
        "utt_id": utt_id,
    }
    rec.update(overrides)
    return {k: v for k, v in rec.items() if v is not None}


def manifest_line(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec).encode("utf-8")
