"""Build small synthetic training pools in a store, in the layout ingestion writes.

``state/pool/CURRENT`` names the version; ``state/pool/{version}/manifest.jsonl`` lists
the utterances with ``audio_filepath`` relative to that folder; the audio is 16-bit mono
WAV at ``state/audio/{sha[:2]}/{sha}.wav``. Signals are tones plus noise: enough for
feature and sampling tests, not for learning anything.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from pipeline.storage import ObjectStore


@dataclass(frozen=True)
class UttSpec:
    utt_id: str
    speaker: str
    group: str
    duration: float
    text: str = "one two three"


def synthesize_wav(duration: float, sample_rate: int, seed: int) -> bytes:
    """A tone with noise, as 16-bit mono WAV bytes (``seed`` makes each one different)."""
    rng = np.random.default_rng(seed)
    n = int(round(duration * sample_rate))
    t = np.arange(n) / sample_rate
    freq = 200 + 50 * (seed % 30)
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(n)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def make_specs(n: int, *, speakers: int = 5, groups: int = 2, seed: int = 0,
               min_s: float = 0.4, max_s: float = 3.0, prefix: str = "u") -> list[UttSpec]:
    rng = np.random.default_rng(seed)
    return [
        UttSpec(
            utt_id=f"{prefix}{i:05d}",
            speaker=f"spk{i % speakers}",
            group=f"grp{(i % speakers) % groups}",
            duration=round(float(rng.uniform(min_s, max_s)), 3),
        )
        for i in range(n)
    ]


def write_pool(store: ObjectStore, specs: Iterable[UttSpec], *, version: str = "v1",
               sample_rate: int = 8000, reuse_rows: list[dict] | None = None) -> list[dict]:
    """Write audio for ``specs`` and a pool manifest holding ``reuse_rows`` + the new rows."""
    rows = list(reuse_rows or [])
    for spec in specs:
        seed = int(hashlib.sha256(spec.utt_id.encode()).hexdigest()[:8], 16)
        data = synthesize_wav(spec.duration, sample_rate, seed)
        sha = hashlib.sha256(data).hexdigest()
        key = f"state/audio/{sha[:2]}/{sha}.wav"
        if not store.exists(key):
            store.put_bytes(key, data)
        rows.append({
            "audio_filepath": f"../../audio/{sha[:2]}/{sha}.wav",
            "duration": round(sf.info(io.BytesIO(data)).frames / sample_rate, 4),
            "text": spec.text,
            "speaker": spec.speaker,
            "group": spec.group,
            "utt_id": spec.utt_id,
            "sha256": sha,
            "drop": "week-001",
        })
    store.put_text(f"state/pool/{version}/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    store.put_text("state/pool/CURRENT", version)
    return rows
