"""The sound of the demo corpus: FSDD recordings and eSpeak speech made into utterance files.

An FSDD utterance joins one speaker's recordings of its digits (from the Free Spoken Digit
Dataset, read lazily and converted to the corpus sample rate) with short pauses; a
synthetic one is eSpeak's waveform (:mod:`pipeline.demo.tts`) trimmed of its silent ends.
Both get lead and trail silence and then their recording condition
(:func:`pipeline.demo.conditions.apply_condition`: level, digital silence or a noise floor,
DC offset); golden v1's utterances, which have no condition, keep their original sound
(:func:`pad_and_level`: a random peak level and low background noise). They are encoded as
16-bit WAV or FLAC (:func:`encode`), at the corpus rate or in the variants ingestion must
convert (another rate, stereo). Every random choice comes from the utterance's own render
seed, so its bytes depend on nothing else; resampling keeps one cached kernel per rate pair
(:func:`pipeline.data.audio.resample`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.data.audio import resample
from pipeline.demo.conditions import apply_condition

GOLDEN_TAKES: range = range(0, 5)  # the FSDD test convention
DROP_TAKES: range = range(5, 50)

_LEAD_S = (0.05, 0.20)
_PAUSE_S = (0.05, 0.25)
_PEAK = (0.3, 0.9)
_NOISE_DBFS = (-72.0, -58.0)


class CorpusError(RuntimeError):
    """The demo corpus cannot be built; the message says what to change."""


class FsddNotFoundError(CorpusError, FileNotFoundError):
    """The FSDD recordings are missing or incomplete where ``demo.fsdd_dir`` points."""


class FsddRecordings:
    """The FSDD recordings, checked up front, read lazily and converted to the corpus sample rate."""

    def __init__(self, root: Path, sample_rate: int, speakers: Sequence[str]):
        self.root = root
        self.sample_rate = sample_rate
        recordings = root / "recordings"
        meta = root / "speakers.json"
        hint = (
            "set demo.fsdd_dir in the configuration (or ASR_RETUNE__DEMO__FSDD_DIR) to the folder "
            "holding the Free Spoken Digit Dataset: speakers.json and recordings/{digit}_{speaker}_{take}.wav"
        )
        if not root.is_dir():
            raise FsddNotFoundError(f"FSDD folder not found: looked in {root}; {hint}")
        if not meta.is_file() or not recordings.is_dir():
            raise FsddNotFoundError(f"FSDD folder {root} has no speakers.json or recordings/ folder; {hint}")
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FsddNotFoundError(f"cannot read {meta}: {exc}; {hint}") from None
        self.accents: dict[str, str] = {}
        for speaker in speakers:
            accent = info.get(speaker, {}).get("accent") if isinstance(info.get(speaker), dict) else None
            if not accent:
                raise FsddNotFoundError(f"{meta} gives no accent for speaker {speaker!r}; {hint}")
            self.accents[speaker] = str(accent)
        self.names = {p.name for p in recordings.iterdir() if p.suffix == ".wav"}
        for speaker in speakers:
            for digit in range(10):
                for takes, use in ((GOLDEN_TAKES, "golden"), (DROP_TAKES, "drop")):
                    if not self.takes(digit, speaker, takes):
                        raise FsddNotFoundError(
                            f"FSDD in {recordings} has no {use} take ({takes.start}-{takes.stop - 1}) of digit "
                            f"{digit} by {speaker!r}; {hint}"
                        )
        self._cache: dict[str, np.ndarray] = {}

    def takes(self, digit: int, speaker: str, allowed: range) -> list[int]:
        return [t for t in allowed if f"{digit}_{speaker}_{t}.wav" in self.names]

    def recording(self, digit: int, speaker: str, take: int) -> np.ndarray:
        name = f"{digit}_{speaker}_{take}.wav"
        if name not in self._cache:
            pcm, rate = sf.read(self.root / "recordings" / name, dtype="int16", always_2d=True)
            wave = pcm.mean(axis=1).astype(np.float32) / 32768.0
            self._cache[name] = resample(wave, rate, self.sample_rate, cache_kernel=True)
        return self._cache[name]


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch ops on one thread for the build, then restore the caller's setting.

    Resampling one short utterance at a time gains nothing from intra-op threads; on a busy
    2-core machine two threads made each call ~40x slower (12 ms instead of 0.3 ms).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pad(speech: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """``speech`` as float64 between random lead and trail silences (exact zeros)."""
    lead = np.zeros(int(rng.uniform(*_LEAD_S) * sample_rate), dtype=np.float64)
    trail = np.zeros(int(rng.uniform(*_LEAD_S) * sample_rate), dtype=np.float64)
    return np.concatenate([lead, speech.astype(np.float64), trail])


def pad_and_level(speech: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Golden v1's sound: add lead/trail silence, scale to a random peak and add low background noise."""
    x = pad(speech, sample_rate, rng)
    peak = float(np.abs(x).max())
    if peak > 0:
        x *= rng.uniform(*_PEAK) / peak
    sigma = 10.0 ** (rng.uniform(*_NOISE_DBFS) / 20.0)
    x += rng.normal(0.0, sigma, size=x.size)
    return x


def _record(speech: np.ndarray, sample_rate: int, rng: np.random.Generator, condition: str | None) -> np.ndarray:
    if condition is None:
        return pad_and_level(speech, sample_rate, rng)
    return apply_condition(pad(speech, sample_rate, rng), sample_rate, condition, rng)


def render_fsdd(
    fsdd: FsddRecordings, speaker: str, digits: Sequence[int], takes: Sequence[int], render_seed: int, sample_rate: int,
    condition: str | None = None,
) -> np.ndarray:
    """One speaker's recordings of ``digits`` (one take each, its DC removed) joined with random
    pauses (exact zeros), recorded under ``condition`` (``None``: golden v1's :func:`pad_and_level`,
    recordings as they are)."""
    rng = np.random.default_rng(render_seed)
    parts: list[np.ndarray] = []
    for k, (digit, take) in enumerate(zip(digits, takes, strict=True)):
        if k:
            parts.append(np.zeros(int(rng.uniform(*_PAUSE_S) * sample_rate), dtype=np.float32))
        recording = fsdd.recording(digit, speaker, take)
        # FSDD files carry their own DC offset (up to ~4 % of full scale); only the dc_offset condition should.
        parts.append(recording if condition is None else recording - recording.mean())
    return _record(np.concatenate(parts), sample_rate, rng, condition)


def render_speech(
    samples: np.ndarray, tts_rate: int, render_seed: int, sample_rate: int, condition: str | None = None
) -> np.ndarray:
    """eSpeak's samples trimmed of their silent ends, at the corpus rate, recorded under
    ``condition`` (``None``: golden v1's :func:`pad_and_level`)."""
    rng = np.random.default_rng(render_seed + 1)
    loud = np.nonzero(np.abs(samples) > 0.02 * float(np.abs(samples).max()))[0]
    margin = int(0.01 * tts_rate)
    if loud.size:
        samples = samples[max(0, loud[0] - margin) : loud[-1] + margin]
    return _record(resample(samples, tts_rate, sample_rate, cache_kernel=True), sample_rate, rng, condition)


@dataclass
class Encoded:
    """One utterance's file: its bytes, extension and decoded length."""

    data: bytes
    ext: str
    frames: int
    sample_rate: int

    @property
    def duration(self) -> float:
        return round(self.frames / self.sample_rate, 3)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)


def encode(x: np.ndarray, sample_rate: int, audio_format: str) -> Encoded:
    """Encode mono float samples as 16-bit WAV/FLAC in the requested variant
    (``wav``, ``wav_other_rate``, ``wav_stereo`` or ``flac``)."""
    rate, ext, container = sample_rate, "wav", "WAV"
    if audio_format == "wav_other_rate":
        rate = 16000 if sample_rate != 16000 else 8000
        x = resample(x.astype(np.float32), sample_rate, rate, cache_kernel=True).astype(np.float64)
    pcm = _to_pcm16(x)
    if audio_format == "wav_stereo":
        pcm = np.stack([pcm, _to_pcm16(x * 0.8)], axis=1)
    if audio_format == "flac":
        ext, container = "flac", "FLAC"
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format=container, subtype="PCM_16")
    return Encoded(data=buf.getvalue(), ext=ext, frames=int(pcm.shape[0]), sample_rate=rate)
