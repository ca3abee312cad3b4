"""The demo corpus: weekly incoming drops and a versioned golden set of spoken digit sequences.

Utterances are digit sequences ("four one five") of ``demo.min_digits..demo.max_digits``
digits, either concatenated from real recordings of the Free Spoken Digit Dataset (FSDD:
one speaker per utterance, short pauses and a little background noise between digits) or
spoken by eSpeak NG (:mod:`pipeline.demo.tts`) in several voices, rates and pitches.

On-store layout (keys relative to the store root)::

    incoming/{drop_id}/manifest.jsonl     one weekly drop (drop_id = week-001, week-002, ...)
    incoming/{drop_id}/audio/{utt_id}.wav   its audio (a few .flac, 16 kHz or stereo files)
    golden/{version}/manifest.jsonl       the golden set, records carry "seen": true/false
    golden/{version}/audio/{utt_id}.wav
    golden/{version}/meta.json            composition, held-out speakers/voices, attribution

Manifest lines are NeMo-compatible JSON (keys sorted): ``audio_filepath`` (relative to the
manifest's folder), ``duration`` (seconds, 3 decimals), ``text`` (normalized digit words),
``speaker``, ``group`` (FSDD accent such as ``USA/neutral``, or ``synthetic``), ``utt_id``,
``sha256`` (of the audio file's bytes), plus ``source`` (the FSDD recordings or the eSpeak
voice settings that made it) and, in the golden set only, ``seen``.

Leakage rules: FSDD takes 0-4 are used only in the golden set and takes 5-49 only in drops;
the FSDD speaker(s) in :data:`HELD_OUT_SPEAKERS` and the eSpeak voice(s) in
:data:`HELD_OUT_VOICES` appear only in the golden set (``"seen": false``); synthetic golden
utterances use odd speaking rates and drops even ones, so no synthetic utterance repeats.

Drops change week to week (:func:`plan_week`): week 1 has three FSDD speakers and two
voices, each later week adds a speaker or voice until the pools are exhausted, and the
dominant speaker and voice rotate. About 10 % of a drop's files are FLAC, 16 kHz or stereo
to exercise ingestion. With ``defects_per_drop > 0`` each drop's manifest ends with records
ingestion must quarantine (utt_id ``defect-{kind}-...``, kinds in :data:`DEFECT_KINDS`).

Output is byte-identical for the same seed and sizes: every drop and the golden set draw
from their own seeded generator, eSpeak runs in a fresh process per drop (its waveform
generator keeps state between calls), and WAV/FLAC/JSON are written deterministically.
A drop's audio is written before its manifest, which marks the drop complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from pipeline.config import DemoConfig
from pipeline.storage import ObjectStore, join
from pipeline.data.text import DIGIT_WORDS
from pipeline.demo.tts import SpeechRequest, synthesize_isolated

__all__ = [
    "DEFECT_KINDS",
    "DROP_SPEAKERS",
    "DROP_VOICES",
    "GOLDEN_TAKES",
    "DROP_TAKES",
    "HELD_OUT_SPEAKERS",
    "HELD_OUT_VOICES",
    "CorpusError",
    "FsddNotFoundError",
    "WeekPlan",
    "build_demo_corpus",
    "drop_id_for_week",
    "plan_week",
]

# FSDD speakers in order of arrival in the drops; george (Greek accent) never arrives.
DROP_SPEAKERS: tuple[str, ...] = ("jackson", "nicolas", "yweweler", "lucas")
HELD_OUT_SPEAKERS: tuple[str, ...] = ("george",)
# eSpeak NG voices in order of arrival; the Scottish-English female voice never arrives.
DROP_VOICES: tuple[str, ...] = ("en+m1", "en+f3", "en-us+m3", "en+f2", "en-us+f4", "en-gb-x-rp+m7", "en+m4")
HELD_OUT_VOICES: tuple[str, ...] = ("en-gb-scotland+f4",)
# Seen voices in the golden set: those every corpus of >= 2 weeks has in its drops.
GOLDEN_SEEN_VOICES: tuple[str, ...] = DROP_VOICES[:3]

GOLDEN_TAKES: range = range(0, 5)  # the FSDD test convention
DROP_TAKES: range = range(5, 50)

SYNTHETIC_GROUP = "synthetic"
DEFECT_KINDS: tuple[str, ...] = (
    "corrupt_audio",
    "empty_text",
    "missing_audio",
    "not_json",
    "path_escape",
    "silent_audio",
    "duration_mismatch",
    "duplicate_audio",
)

_RATES = (130, 210)  # eSpeak words per minute; drops use even values, the golden set odd ones
_PITCHES = (25, 75)
_LEAD_S = (0.05, 0.20)
_PAUSE_S = (0.05, 0.25)
_PEAK = (0.3, 0.9)
_NOISE_DBFS = (-72.0, -58.0)
_FORMAT_PERIOD = 30  # in every 30 drop utterances: one WAV at another rate (16 kHz), one stereo WAV, one FLAC
_FORMAT_SLOTS = {7: "wav_other_rate", 17: "wav_stereo", 27: "flac"}
_STREAM_GOLDEN, _STREAM_DROP = 0, 1
_ATTRIBUTION = (
    "Contains recordings from the Free Spoken Digit Dataset (Zohar Jackson and contributors, "
    "github.com/Jakobovski/free-spoken-digit-dataset), CC BY-SA 4.0, and speech synthesized "
    "with eSpeak NG."
)


class CorpusError(RuntimeError):
    """The demo corpus cannot be built; the message says what to change."""


class FsddNotFoundError(CorpusError, FileNotFoundError):
    """The FSDD recordings are missing or incomplete where ``demo.fsdd_dir`` points."""


@dataclass(frozen=True)
class WeekPlan:
    """Who speaks in one weekly drop, and how often (weights sum to 1)."""

    week: int
    drop_id: str
    speakers: tuple[str, ...]
    speaker_weights: tuple[float, ...]
    voices: tuple[str, ...]
    voice_weights: tuple[float, ...]


@dataclass(frozen=True)
class _Utterance:
    """Everything needed to render one utterance, drawn up front from the set's generator."""

    utt_id: str
    digits: tuple[int, ...]
    speaker: str
    group: str
    render_seed: int
    takes: tuple[int, ...] = ()  # FSDD take per digit; empty for synthetic speech
    voice: str | None = None
    rate: int = 0
    pitch: int = 0
    audio_format: str = "wav"
    seen: bool | None = None

    @property
    def text(self) -> str:
        return " ".join(DIGIT_WORDS[d] for d in self.digits)

    @property
    def source(self) -> list[str]:
        if self.voice is not None:
            return [f"espeak:{self.voice}:rate={self.rate}:pitch={self.pitch}"]
        return [f"fsdd:{d}_{self.speaker}_{t}" for d, t in zip(self.digits, self.takes, strict=True)]


@dataclass
class _Encoded:
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


@dataclass
class _SetOutput:
    """The files and manifest lines of one drop or of the golden set."""

    prefix: str
    files: list[tuple[str, bytes]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    defects: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def drop_id_for_week(week: int) -> str:
    """The drop id of week ``week`` (1-based): ``week-001``; ids sort in week order."""
    if week < 1:
        raise ValueError(f"week must be >= 1, got {week}")
    return f"week-{week:03d}"


def plan_week(week: int) -> WeekPlan:
    """The deterministic speaker/voice schedule of week ``week`` (1-based).

    Week 1 has 3 FSDD speakers and 2 voices; every later week adds one speaker (until
    :data:`DROP_SPEAKERS` is exhausted) and one voice (until :data:`DROP_VOICES` is), and
    the dominant speaker and voice (twice the weight of the others) rotate week by week.
    """
    if week < 1:
        raise ValueError(f"week must be >= 1, got {week}")
    speakers = DROP_SPEAKERS[: min(len(DROP_SPEAKERS), 2 + week)]
    voices = DROP_VOICES[: min(len(DROP_VOICES), 1 + week)]
    return WeekPlan(
        week=week,
        drop_id=drop_id_for_week(week),
        speakers=speakers,
        speaker_weights=_rotating_weights(len(speakers), week),
        voices=voices,
        voice_weights=_rotating_weights(len(voices), week),
    )


def _rotating_weights(n: int, week: int) -> tuple[float, ...]:
    raw = [2.0 if i == (week - 1) % n else 1.0 for i in range(n)]
    total = sum(raw)
    return tuple(w / total for w in raw)


class _Fsdd:
    """The FSDD recordings, read lazily and converted to the corpus sample rate."""

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
            self._cache[name] = _resample(wave, rate, self.sample_rate)
        return self._cache[name]


def _resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    if orig == new or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    import torch

    with torch.no_grad():
        return _resampler(orig, new)(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))).numpy()


@functools.lru_cache(maxsize=8)
def _resampler(orig: int, new: int) -> Any:
    """A torchaudio resampler whose filter kernel is computed once per rate pair."""
    import torchaudio.transforms as AT

    return AT.Resample(orig, new)


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
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


def _seed_sequence(seed: int, stream: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed % 2**64, stream, index])


def _draw_digits(rng: np.random.Generator, demo: DemoConfig) -> tuple[int, ...]:
    n = int(rng.integers(demo.min_digits, demo.max_digits + 1))
    return tuple(int(d) for d in rng.integers(0, 10, size=n))


def _draw_rate(rng: np.random.Generator, odd: bool) -> int:
    rate = int(rng.integers(_RATES[0] // 2, _RATES[1] // 2 + 1)) * 2
    return rate + 1 if odd else rate


def _plan_drop(plan: WeekPlan, demo: DemoConfig, count: int, fsdd: _Fsdd, rng: np.random.Generator) -> list[_Utterance]:
    synthetic = _synthetic_mask(rng, count, demo.synthetic_fraction)
    out: list[_Utterance] = []
    for i in range(count):
        utt_id = f"{plan.drop_id}-{i:05d}"
        digits = _draw_digits(rng, demo)
        fmt = _FORMAT_SLOTS.get(i % _FORMAT_PERIOD, "wav")
        if synthetic[i]:
            voice = plan.voices[int(rng.choice(len(plan.voices), p=plan.voice_weights))]
            out.append(
                _Utterance(
                    utt_id=utt_id, digits=digits, speaker=f"espeak-{voice}", group=SYNTHETIC_GROUP,
                    voice=voice, rate=_draw_rate(rng, odd=False),
                    pitch=int(rng.integers(_PITCHES[0], _PITCHES[1] + 1)),
                    render_seed=int(rng.integers(2**31 - 1)), audio_format=fmt,
                )
            )
        else:
            speaker = plan.speakers[int(rng.choice(len(plan.speakers), p=plan.speaker_weights))]
            takes = tuple(int(rng.choice(fsdd.takes(d, speaker, DROP_TAKES))) for d in digits)
            out.append(
                _Utterance(
                    utt_id=utt_id, digits=digits, speaker=speaker, group=fsdd.accents[speaker], takes=takes,
                    render_seed=int(rng.integers(2**31 - 1)), audio_format=fmt,
                )
            )
    return out


def _plan_golden(demo: DemoConfig, version: str, count: int, fsdd: _Fsdd, rng: np.random.Generator) -> list[_Utterance]:
    """A balanced golden set: equal shares per FSDD speaker and per voice, held-out ones included."""
    synthetic = _synthetic_mask(rng, count, demo.synthetic_fraction)
    n_synth = int(synthetic.sum())
    speakers = DROP_SPEAKERS + HELD_OUT_SPEAKERS
    voices = GOLDEN_SEEN_VOICES + HELD_OUT_VOICES
    speaker_order = rng.permutation(np.arange(count - n_synth) % len(speakers))
    voice_order = rng.permutation(np.arange(n_synth) % len(voices))
    out: list[_Utterance] = []
    k_spk = k_voice = 0
    for i in range(count):
        utt_id = f"golden-{version}-{i:05d}"
        digits = _draw_digits(rng, demo)
        if synthetic[i]:
            voice = voices[int(voice_order[k_voice])]
            k_voice += 1
            out.append(
                _Utterance(
                    utt_id=utt_id, digits=digits, speaker=f"espeak-{voice}", group=SYNTHETIC_GROUP,
                    voice=voice, rate=_draw_rate(rng, odd=True),
                    pitch=int(rng.integers(_PITCHES[0], _PITCHES[1] + 1)),
                    render_seed=int(rng.integers(2**31 - 1)), seen=voice not in HELD_OUT_VOICES,
                )
            )
        else:
            speaker = speakers[int(speaker_order[k_spk])]
            k_spk += 1
            takes = tuple(int(rng.choice(fsdd.takes(d, speaker, GOLDEN_TAKES))) for d in digits)
            out.append(
                _Utterance(
                    utt_id=utt_id, digits=digits, speaker=speaker, group=fsdd.accents[speaker], takes=takes,
                    render_seed=int(rng.integers(2**31 - 1)), seen=speaker not in HELD_OUT_SPEAKERS,
                )
            )
    return out


def _synthetic_mask(rng: np.random.Generator, count: int, fraction: float) -> np.ndarray:
    mask = np.zeros(count, dtype=bool)
    mask[: int(round(count * fraction))] = True
    return rng.permutation(mask)


def _speech_requests(plans: Sequence[_Utterance]) -> list[SpeechRequest]:
    """eSpeak requests for the synthetic utterances; commas sometimes make eSpeak pause."""
    requests = []
    for u in plans:
        if u.voice is None:
            continue
        rng = np.random.default_rng(u.render_seed)
        joiner = ", " if rng.random() < 0.3 else " "
        words = joiner.join(DIGIT_WORDS[d] for d in u.digits)
        requests.append(SpeechRequest(text=words, voice=u.voice, rate=u.rate, pitch=u.pitch, seed=u.render_seed))
    return requests


def _submit_speech(executor: ThreadPoolExecutor, plans: Sequence[_Utterance]) -> Future | None:
    """Start eSpeak for the synthetic utterances of one set, in a fresh process of its own."""
    requests = _speech_requests(plans)
    return executor.submit(synthesize_isolated, requests) if requests else None


def _pad_and_level(speech: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Add lead/trail silence, scale to a random peak and add low background noise."""
    lead = np.zeros(int(rng.uniform(*_LEAD_S) * sample_rate), dtype=np.float64)
    trail = np.zeros(int(rng.uniform(*_LEAD_S) * sample_rate), dtype=np.float64)
    x = np.concatenate([lead, speech.astype(np.float64), trail])
    peak = float(np.abs(x).max())
    if peak > 0:
        x *= rng.uniform(*_PEAK) / peak
    sigma = 10.0 ** (rng.uniform(*_NOISE_DBFS) / 20.0)
    x += rng.normal(0.0, sigma, size=x.size)
    return x


def _render_fsdd(u: _Utterance, fsdd: _Fsdd, sample_rate: int) -> np.ndarray:
    rng = np.random.default_rng(u.render_seed)
    parts: list[np.ndarray] = []
    for k, (digit, take) in enumerate(zip(u.digits, u.takes, strict=True)):
        if k:
            parts.append(np.zeros(int(rng.uniform(*_PAUSE_S) * sample_rate), dtype=np.float32))
        parts.append(fsdd.recording(digit, u.speaker, take))
    return _pad_and_level(np.concatenate(parts), sample_rate, rng)


def _render_speech(u: _Utterance, samples: np.ndarray, tts_rate: int, sample_rate: int) -> np.ndarray:
    rng = np.random.default_rng(u.render_seed + 1)
    loud = np.nonzero(np.abs(samples) > 0.02 * float(np.abs(samples).max()))[0]
    margin = int(0.01 * tts_rate)
    if loud.size:
        samples = samples[max(0, loud[0] - margin) : loud[-1] + margin]
    return _pad_and_level(_resample(samples, tts_rate, sample_rate), sample_rate, rng)


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)


def _encode(x: np.ndarray, sample_rate: int, audio_format: str) -> _Encoded:
    """Encode mono float samples as 16-bit WAV/FLAC in the requested variant."""
    rate, ext, container = sample_rate, "wav", "WAV"
    if audio_format == "wav_other_rate":
        rate = 16000 if sample_rate != 16000 else 8000
        x = _resample(x.astype(np.float32), sample_rate, rate).astype(np.float64)
    pcm = _to_pcm16(x)
    if audio_format == "wav_stereo":
        pcm = np.stack([pcm, _to_pcm16(x * 0.8)], axis=1)
    if audio_format == "flac":
        ext, container = "flac", "FLAC"
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format=container, subtype="PCM_16")
    return _Encoded(data=buf.getvalue(), ext=ext, frames=int(pcm.shape[0]), sample_rate=rate)


def _manifest_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


def _add_utterance(out: _SetOutput, u: _Utterance, enc: _Encoded) -> None:
    rel = f"audio/{u.utt_id}.{enc.ext}"
    record: dict[str, Any] = {
        "audio_filepath": rel,
        "duration": enc.duration,
        "group": u.group,
        "sha256": enc.sha256,
        "source": u.source,
        "speaker": u.speaker,
        "text": u.text,
        "utt_id": u.utt_id,
    }
    if u.seen is not None:
        record["seen"] = u.seen
    out.files.append((join(out.prefix, rel), enc.data))
    out.lines.append(_manifest_line(record))
    out.records.append(record)
    out.formats[u.audio_format] += 1
    out.seconds += enc.frames / enc.sample_rate


def _render_set(
    plans: Sequence[_Utterance], speech: Future | None, fsdd: _Fsdd, sample_rate: int, prefix: str, bar: tqdm
) -> _SetOutput:
    out = _SetOutput(prefix=prefix)
    synthesized: list[np.ndarray] = []
    tts_rate = 0
    if speech is not None:
        synthesized, tts_rate = speech.result()
    k = 0
    for u in plans:
        if u.voice is None:
            wave = _render_fsdd(u, fsdd, sample_rate)
        else:
            wave = _render_speech(u, synthesized[k], tts_rate, sample_rate)
            k += 1
        _add_utterance(out, u, _encode(wave, sample_rate, u.audio_format))
        bar.update(1)
    return out


def _salt_defects(
    out: _SetOutput, drop_id: str, count: int, base: Sequence[_Utterance], fsdd: _Fsdd,
    sample_rate: int, rng: np.random.Generator,
) -> None:
    """Append ``count`` records that ingestion must quarantine, cycling through :data:`DEFECT_KINDS`."""
    fsdd_plans = [u for u in base if u.voice is None] or list(base)
    for j in range(count):
        kind = DEFECT_KINDS[j % len(DEFECT_KINDS)]
        utt_id = f"defect-{kind}-{drop_id}-{j:03d}"
        template = fsdd_plans[int(rng.integers(len(fsdd_plans)))]
        if template.voice is None:
            wave = _render_fsdd(template, fsdd, sample_rate)
        else:  # a drop without FSDD utterances: a silent-ish stand-in is enough for a defect
            wave = rng.normal(0.0, 0.1, size=sample_rate)
        enc = _encode(wave + rng.normal(0.0, 1e-3, size=wave.size), sample_rate, "wav")
        rel = f"audio/{utt_id}.wav"
        record: dict[str, Any] = {
            "audio_filepath": rel, "duration": enc.duration, "group": template.group, "sha256": enc.sha256,
            "source": ["defect"], "speaker": template.speaker, "text": template.text, "utt_id": utt_id,
        }
        data: bytes | None = enc.data
        if kind == "corrupt_audio":
            data = b"RIFF" + rng.bytes(2044)
            record["sha256"] = hashlib.sha256(data).hexdigest()
        elif kind == "empty_text":
            record["text"] = ""
        elif kind == "missing_audio":
            data = None
        elif kind == "not_json":
            out.lines.append(f'{{"audio_filepath": "{rel}", "text": "{template.text}", "utt_id": "{utt_id}"\n')
            out.defects[kind] += 1
            continue
        elif kind == "path_escape":
            record["audio_filepath"] = f"../{utt_id}.wav"
            data = None
        elif kind == "silent_audio":
            frames = int(rng.integers(sample_rate // 2, 2 * sample_rate))
            enc = _encode(np.zeros(frames), sample_rate, "wav")
            data = enc.data
            record.update(duration=enc.duration, sha256=enc.sha256)
        elif kind == "duration_mismatch":
            record["duration"] = round(enc.duration + 2.5, 3)
        elif kind == "duplicate_audio":
            original = out.records[int(rng.integers(len(out.records)))]
            data = dict(out.files)[join(out.prefix, original["audio_filepath"])]
            ext = original["audio_filepath"].rsplit(".", 1)[-1]
            rel = f"audio/{utt_id}.{ext}"
            record.update(
                audio_filepath=rel, duration=original["duration"], sha256=original["sha256"],
                text=original["text"], speaker=original["speaker"], group=original["group"],
            )
        if data is not None:
            out.files.append((join(out.prefix, record["audio_filepath"]), data))
        out.lines.append(_manifest_line(record))
        out.defects[kind] += 1


def _write_set(store: ObjectStore, out: _SetOutput, pool: ThreadPoolExecutor) -> str:
    """Write the audio (in parallel), then the manifest last; return the manifest key."""
    for future in [pool.submit(store.put_bytes, key, data) for key, data in out.files]:
        future.result()
    manifest_key = join(out.prefix, "manifest.jsonl")
    store.put_bytes(manifest_key, "".join(out.lines).encode("utf-8"))
    return manifest_key


def _golden_meta(out: _SetOutput, version: str, seed: int, sample_rate: int, demo: DemoConfig) -> dict[str, Any]:
    speakers: dict[str, dict[str, Any]] = {}
    for r in out.records:
        entry = speakers.setdefault(r["speaker"], {"group": r["group"], "seen": r["seen"], "utterances": 0})
        entry["utterances"] += 1
    seen = sum(1 for r in out.records if r["seen"])
    return {
        "attribution": _ATTRIBUTION,
        "digits": [demo.min_digits, demo.max_digits],
        "fsdd_takes": [GOLDEN_TAKES.start, GOLDEN_TAKES.stop - 1],
        "held_out_speakers": list(HELD_OUT_SPEAKERS),
        "held_out_voices": [f"espeak-{v}" for v in HELD_OUT_VOICES],
        "sample_rate": sample_rate,
        "seed": seed,
        "seen_means": "the speaker or voice is in the drop schedule from week 2 on; held-out ones never are",
        "seen_utterances": seen,
        "speakers": speakers,
        "synthetic_fraction": demo.synthetic_fraction,
        "unseen_utterances": len(out.records) - seen,
        "utterances": len(out.records),
        "version": version,
    }


def _check_golden_unchanged(store: ObjectStore, prefix: str, manifest: bytes) -> None:
    key = join(prefix, "manifest.jsonl")
    if store.exists(key) and store.get_bytes(key) != manifest:
        raise CorpusError(
            f"golden set {store.uri(key)} already exists with different content (another seed or size?): "
            "a golden version is never rewritten; set demo.golden_version to a new version, "
            f"or delete {store.uri(prefix)} to rebuild it"
        )


def _drop_summary(store: ObjectStore, plan: WeekPlan, out: _SetOutput, manifest_key: str) -> dict[str, Any]:
    speakers = Counter(r["speaker"] for r in out.records)
    return {
        "drop_id": plan.drop_id,
        "prefix": out.prefix + "/",
        "manifest_uri": store.uri(manifest_key),
        "utterances": len(out.records),
        "fsdd_utterances": sum(1 for r in out.records if r["group"] != SYNTHETIC_GROUP),
        "synthetic_utterances": sum(1 for r in out.records if r["group"] == SYNTHETIC_GROUP),
        "speakers": dict(sorted(speakers.items())),
        "fsdd_speakers": list(plan.speakers),
        "voices": list(plan.voices),
        "formats": dict(sorted(out.formats.items())),
        "defects": sum(out.defects.values()),
        "defect_kinds": dict(sorted(out.defects.items())),
        "hours": round(out.seconds / 3600.0, 4),
    }


def build_demo_corpus(
    store: ObjectStore,
    demo: DemoConfig,
    sample_rate: int,
    *,
    weeks: int | None = None,
    seed: int | None = None,
    defects_per_drop: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``weeks`` weekly drops under ``incoming/`` and the golden set under ``golden/``.

    ``weeks``, ``seed`` and ``defects_per_drop`` override the ``demo`` fields of the same
    name. Existing drops of the same ids are replaced; an existing golden version is left
    as it is when identical and refused (:class:`CorpusError`) when it would change.
    Raises :class:`FsddNotFoundError` when ``demo.fsdd_dir`` holds no usable FSDD copy.
    Returns a JSON-able summary: the drops (ids, URIs, counts, speakers, voices, formats,
    defects) and the golden set (version, URIs, seen/unseen counts).
    """
    started = time.monotonic()
    weeks = demo.weeks if weeks is None else weeks
    seed = demo.seed if seed is None else seed
    defects_per_drop = demo.defects_per_drop if defects_per_drop is None else defects_per_drop
    if weeks < 1:
        raise CorpusError(f"weeks must be >= 1, got {weeks}")
    if defects_per_drop < 0:
        raise CorpusError(f"defects_per_drop must be >= 0, got {defects_per_drop}")
    version = demo.golden_version
    fsdd = _Fsdd(demo.fsdd_path(), sample_rate, DROP_SPEAKERS + HELD_OUT_SPEAKERS)

    golden_plans = _plan_golden(
        demo, version, demo.golden_utterances, fsdd, np.random.default_rng(_seed_sequence(seed, _STREAM_GOLDEN, 0))
    )
    week_plans = [plan_week(w) for w in range(1, weeks + 1)]
    drop_rngs = [np.random.default_rng(_seed_sequence(seed, _STREAM_DROP, p.week)) for p in week_plans]
    drop_plans = [
        _plan_drop(p, demo, demo.utterances_per_week, fsdd, rng) for p, rng in zip(week_plans, drop_rngs, strict=True)
    ]

    total = len(golden_plans) + sum(len(p) for p in drop_plans)
    golden_prefix = join("golden", version)
    with (
        ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as speech_pool,
        ThreadPoolExecutor(max_workers=8) as writers,
        tqdm(total=total, desc="demo corpus", unit="utt", file=sys.stderr, disable=not progress) as bar,
        _single_threaded_torch(),
    ):
        # eSpeak runs in fresh processes while FSDD utterances are rendered here.
        golden_speech = _submit_speech(speech_pool, golden_plans)
        drop_speech = [_submit_speech(speech_pool, plans) for plans in drop_plans]

        golden = _render_set(golden_plans, golden_speech, fsdd, sample_rate, golden_prefix, bar)
        _check_golden_unchanged(store, golden_prefix, "".join(golden.lines).encode("utf-8"))
        golden_key = _write_set(store, golden, writers)
        meta = _golden_meta(golden, version, seed, sample_rate, demo)
        meta_key = join(golden_prefix, "meta.json")
        store.put_text(meta_key, json.dumps(meta, indent=2, sort_keys=True) + "\n")

        drops = []
        for plan, plans, speech, rng in zip(week_plans, drop_plans, drop_speech, drop_rngs, strict=True):
            prefix = join("incoming", plan.drop_id)
            out = _render_set(plans, speech, fsdd, sample_rate, prefix, bar)
            _salt_defects(out, plan.drop_id, defects_per_drop, plans, fsdd, sample_rate, rng)
            store.delete_prefix(prefix + "/")
            drops.append(_drop_summary(store, plan, out, _write_set(store, out, writers)))

    return {
        "store_root": store.root,
        "seed": seed,
        "sample_rate": sample_rate,
        "weeks": weeks,
        "drops": drops,
        "golden": {
            "version": version,
            "prefix": golden_prefix + "/",
            "manifest_uri": store.uri(golden_key),
            "meta_uri": store.uri(meta_key),
            "utterances": meta["utterances"],
            "seen_utterances": meta["seen_utterances"],
            "unseen_utterances": meta["unseen_utterances"],
            "held_out_speakers": meta["held_out_speakers"],
            "held_out_voices": meta["held_out_voices"],
        },
        "utterances": total,
        "elapsed_s": round(time.monotonic() - started, 2),
    }
