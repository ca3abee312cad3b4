"""Who says what in the demo corpus: the weekly speaker/voice schedule and each utterance's plan.

Drops change week to week (:func:`plan_week`): week 1 has three FSDD speakers and two
voices, each later week adds a speaker or voice until the pools are exhausted, and the
dominant speaker and voice rotate. About 10 % of a drop's files are FLAC, 16 kHz or stereo
to exercise ingestion. The golden set is balanced: equal shares per FSDD speaker and per
voice, held-out ones included.

Leakage rules: FSDD takes 0-4 are used only in the golden set and takes 5-49 only in drops;
the FSDD speaker(s) in :data:`HELD_OUT_SPEAKERS` and the eSpeak voice(s) in
:data:`HELD_OUT_VOICES` appear only in the golden set (``"seen": false``); synthetic golden
utterances use odd speaking rates and drops even ones, so no synthetic utterance repeats.

Every set draws its plans from its own seeded generator (:func:`golden_rng`,
:func:`drop_rng`), up front, so a set's utterances do not move when another set changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import DemoConfig
from pipeline.data.text import DIGIT_WORDS
from pipeline.demo.recordings import DROP_TAKES, GOLDEN_TAKES, FsddRecordings

# FSDD speakers in order of arrival in the drops; george (Greek accent) never arrives.
DROP_SPEAKERS: tuple[str, ...] = ("jackson", "nicolas", "yweweler", "lucas")
HELD_OUT_SPEAKERS: tuple[str, ...] = ("george",)
# eSpeak NG voices in order of arrival; the Scottish-English female voice never arrives.
DROP_VOICES: tuple[str, ...] = ("en+m1", "en+f3", "en-us+m3", "en+f2", "en-us+f4", "en-gb-x-rp+m7", "en+m4")
HELD_OUT_VOICES: tuple[str, ...] = ("en-gb-scotland+f4",)
# Seen voices in the golden set: those every corpus of >= 2 weeks has in its drops.
GOLDEN_SEEN_VOICES: tuple[str, ...] = DROP_VOICES[:3]
SYNTHETIC_GROUP = "synthetic"

_RATES = (130, 210)  # eSpeak words per minute; drops use even values, the golden set odd ones
_PITCHES = (25, 75)
_FORMAT_PERIOD = 30  # in every 30 drop utterances: one WAV at another rate (16 kHz), one stereo WAV, one FLAC
_FORMAT_SLOTS = {7: "wav_other_rate", 17: "wav_stereo", 27: "flac"}
_STREAM_GOLDEN, _STREAM_DROP = 0, 1


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
class UtterancePlan:
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


def golden_rng(seed: int) -> np.random.Generator:
    """The golden set's own generator."""
    return np.random.default_rng(_seed_sequence(seed, _STREAM_GOLDEN, 0))


def drop_rng(seed: int, week: int) -> np.random.Generator:
    """Week ``week``'s drop's own generator (its plans, then its defects)."""
    return np.random.default_rng(_seed_sequence(seed, _STREAM_DROP, week))


def _seed_sequence(seed: int, stream: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed % 2**64, stream, index])


def _draw_digits(rng: np.random.Generator, demo: DemoConfig) -> tuple[int, ...]:
    n = int(rng.integers(demo.min_digits, demo.max_digits + 1))
    return tuple(int(d) for d in rng.integers(0, 10, size=n))


def _draw_rate(rng: np.random.Generator, odd: bool) -> int:
    rate = int(rng.integers(_RATES[0] // 2, _RATES[1] // 2 + 1)) * 2
    return rate + 1 if odd else rate


def _draw_pitch(rng: np.random.Generator) -> int:
    return int(rng.integers(_PITCHES[0], _PITCHES[1] + 1))


def _synthetic_mask(rng: np.random.Generator, count: int, fraction: float) -> np.ndarray:
    mask = np.zeros(count, dtype=bool)
    mask[: int(round(count * fraction))] = True
    return rng.permutation(mask)


def plan_drop(
    plan: WeekPlan, demo: DemoConfig, count: int, fsdd: FsddRecordings, rng: np.random.Generator
) -> list[UtterancePlan]:
    """The ``count`` utterances of one weekly drop, speakers and voices drawn by the week's weights."""
    synthetic = _synthetic_mask(rng, count, demo.synthetic_fraction)
    out: list[UtterancePlan] = []
    for i in range(count):
        utt_id = f"{plan.drop_id}-{i:05d}"
        digits = _draw_digits(rng, demo)
        fmt = _FORMAT_SLOTS.get(i % _FORMAT_PERIOD, "wav")
        if synthetic[i]:
            voice = plan.voices[int(rng.choice(len(plan.voices), p=plan.voice_weights))]
            out.append(
                UtterancePlan(
                    utt_id=utt_id, digits=digits, speaker=f"espeak-{voice}", group=SYNTHETIC_GROUP,
                    voice=voice, rate=_draw_rate(rng, odd=False), pitch=_draw_pitch(rng),
                    render_seed=int(rng.integers(2**31 - 1)), audio_format=fmt,
                )
            )
        else:
            speaker = plan.speakers[int(rng.choice(len(plan.speakers), p=plan.speaker_weights))]
            takes = tuple(int(rng.choice(fsdd.takes(d, speaker, DROP_TAKES))) for d in digits)
            out.append(
                UtterancePlan(
                    utt_id=utt_id, digits=digits, speaker=speaker, group=fsdd.accents[speaker], takes=takes,
                    render_seed=int(rng.integers(2**31 - 1)), audio_format=fmt,
                )
            )
    return out


def plan_golden(
    demo: DemoConfig, version: str, count: int, fsdd: FsddRecordings, rng: np.random.Generator
) -> list[UtterancePlan]:
    """A balanced golden set: equal shares per FSDD speaker and per voice, held-out ones included."""
    synthetic = _synthetic_mask(rng, count, demo.synthetic_fraction)
    n_synth = int(synthetic.sum())
    speakers = DROP_SPEAKERS + HELD_OUT_SPEAKERS
    voices = GOLDEN_SEEN_VOICES + HELD_OUT_VOICES
    speaker_order = rng.permutation(np.arange(count - n_synth) % len(speakers))
    voice_order = rng.permutation(np.arange(n_synth) % len(voices))
    out: list[UtterancePlan] = []
    k_spk = k_voice = 0
    for i in range(count):
        utt_id = f"golden-{version}-{i:05d}"
        digits = _draw_digits(rng, demo)
        if synthetic[i]:
            voice = voices[int(voice_order[k_voice])]
            k_voice += 1
            out.append(
                UtterancePlan(
                    utt_id=utt_id, digits=digits, speaker=f"espeak-{voice}", group=SYNTHETIC_GROUP,
                    voice=voice, rate=_draw_rate(rng, odd=True), pitch=_draw_pitch(rng),
                    render_seed=int(rng.integers(2**31 - 1)), seen=voice not in HELD_OUT_VOICES,
                )
            )
        else:
            speaker = speakers[int(speaker_order[k_spk])]
            k_spk += 1
            takes = tuple(int(rng.choice(fsdd.takes(d, speaker, GOLDEN_TAKES))) for d in digits)
            out.append(
                UtterancePlan(
                    utt_id=utt_id, digits=digits, speaker=speaker, group=fsdd.accents[speaker], takes=takes,
                    render_seed=int(rng.integers(2**31 - 1)), seen=speaker not in HELD_OUT_SPEAKERS,
                )
            )
    return out
