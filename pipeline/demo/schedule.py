"""Who says what in the weekly drops of the demo corpus: the speaker/voice schedule and each
drop utterance's plan.

Drops change week to week (:func:`plan_week`): week 1 has three FSDD speakers and the
eSpeak accents and variant families of :mod:`pipeline.demo.voices` that arrive in week 1;
each later week adds an FSDD speaker (until :data:`DROP_SPEAKERS` is exhausted) and the
accents/families that arrive then, and the dominant speaker and accent rotate. Every
synthetic utterance draws its own voice (a regular voice, or an accent by the week's
weights and a variant uniformly), rate, pitch, pitch range and word gap; every utterance draws its recording condition
(:data:`pipeline.demo.conditions.DROP_SHARES`). About 10 % of a drop's files are FLAC,
16 kHz or stereo to exercise ingestion.

Leakage rules (the golden side is :mod:`pipeline.demo.golden`): FSDD takes 0-4 are used only
in the golden set and takes 5-49 only in drops; the FSDD speaker(s) in
:data:`HELD_OUT_SPEAKERS`, the held-out accents and variants of :mod:`pipeline.demo.voices`
and the golden-only conditions (``quiet``) never appear in a drop.

Every set draws its plans from its own seeded generator (:func:`golden_rng`,
:func:`drop_rng`), up front, so a set's utterances do not move when another set changes.

Week 3 is a bad drop (:data:`BAD_DROPS`): a vendor batch in which a share of the transcripts
belong to other audio of the same drop. Every record passes ingest's rules (the audio, its
duration and the transcript's characters are all valid); only the pairing is wrong.
:attr:`WeekPlan.mislabelled_share` makes :func:`plan_drop` give that share of the drop's
utterances another utterance's transcript (:func:`mislabel`, :attr:`UtterancePlan.text_digits`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pipeline.config import DemoConfig
from pipeline.data.text import DIGIT_WORDS
from pipeline.demo.conditions import draw_drop_condition
from pipeline.demo.recordings import DROP_TAKES, FsddRecordings
from pipeline.demo.voices import (
    REGULAR_SHARE,
    REGULAR_VOICES,
    VoiceSettings,
    accent_of,
    draw_settings,
    drop_accents,
    drop_variants,
    group_of,
    speaker_of,
    variant_of,
    voice_name,
)

# FSDD speakers in order of arrival in the drops; george (Greek accent) never arrives.
DROP_SPEAKERS: tuple[str, ...] = ("jackson", "nicolas", "yweweler", "lucas")
HELD_OUT_SPEAKERS: tuple[str, ...] = ("george",)

# The bad drops of the recipe: week -> share of its utterances whose transcript belongs to other audio.
BAD_DROPS: dict[int, float] = {3: 0.6}

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
    accents: tuple[str, ...]
    accent_weights: tuple[float, ...]
    variants: tuple[str, ...]
    regular_voices: tuple[str, ...] = ()  # the voices.REGULAR_VOICES that have arrived
    mislabelled_share: float = 0.0  # a bad drop's share of wrong transcripts (issue #18); 0: a clean drop

    @property
    def voices(self) -> tuple[str, ...]:
        """Every voice the drop may speak with (accent x variant)."""
        return tuple(voice_name(a, v) for a in self.accents for v in self.variants)


@dataclass(frozen=True)
class UtterancePlan:
    """Everything needed to render one utterance, drawn up front from the set's generator.

    ``condition`` is ``None`` only in golden v1, whose utterances keep their original sound.
    """

    utt_id: str
    digits: tuple[int, ...]
    speaker: str
    group: str
    render_seed: int
    takes: tuple[int, ...] = ()  # FSDD take per digit; empty for synthetic speech
    voice: VoiceSettings | None = None  # eSpeak settings; None for FSDD recordings
    audio_format: str = "wav"
    seen: bool | None = None
    condition: str | None = None
    text_digits: tuple[int, ...] | None = None  # the transcript when it is not what is said (a bad drop)

    @property
    def text(self) -> str:
        return " ".join(DIGIT_WORDS[d] for d in (self.digits if self.text_digits is None else self.text_digits))

    @property
    def source(self) -> list[str]:
        if self.voice is not None:
            return [self.voice.source if self.condition is not None else self.voice.source_v1]
        return [f"fsdd:{d}_{self.speaker}_{t}" for d, t in zip(self.digits, self.takes, strict=True)]


def drop_id_for_week(week: int) -> str:
    """The drop id of week ``week`` (1-based): ``week-001``; ids sort in week order."""
    if week < 1:
        raise ValueError(f"week must be >= 1, got {week}")
    return f"week-{week:03d}"


def plan_week(week: int) -> WeekPlan:
    """The deterministic speaker/voice schedule of week ``week`` (1-based).

    Week 1 has 3 FSDD speakers; every later week adds one (until :data:`DROP_SPEAKERS` is
    exhausted) and the accents and variant families that arrive that week. The dominant
    speaker and accent (twice the weight of the others) rotate week by week.
    """
    if week < 1:
        raise ValueError(f"week must be >= 1, got {week}")
    speakers = DROP_SPEAKERS[: min(len(DROP_SPEAKERS), 2 + week)]
    accents, variants = drop_accents(week), drop_variants(week)
    return WeekPlan(
        week=week,
        drop_id=drop_id_for_week(week),
        speakers=speakers,
        speaker_weights=rotating_weights(len(speakers), week),
        accents=accents,
        accent_weights=rotating_weights(len(accents), week),
        variants=variants,
        regular_voices=tuple(v for v in REGULAR_VOICES if accent_of(v) in accents and variant_of(v) in variants),
        mislabelled_share=BAD_DROPS.get(week, 0.0),
    )


def rotating_weights(n: int, week: int) -> tuple[float, ...]:
    raw = [2.0 if i == (week - 1) % n else 1.0 for i in range(n)]
    total = sum(raw)
    return tuple(w / total for w in raw)


def golden_rng(seed: int, index: int = 0) -> np.random.Generator:
    """A golden version's own generator (``index`` 0 is golden v1's)."""
    return np.random.default_rng(_seed_sequence(seed, _STREAM_GOLDEN, index))


def drop_rng(seed: int, week: int) -> np.random.Generator:
    """Week ``week``'s drop's own generator (its plans, then its defects)."""
    return np.random.default_rng(_seed_sequence(seed, _STREAM_DROP, week))


def _seed_sequence(seed: int, stream: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed % 2**64, stream, index])


def draw_digits(rng: np.random.Generator, demo: DemoConfig) -> tuple[int, ...]:
    n = int(rng.integers(demo.min_digits, demo.max_digits + 1))
    return tuple(int(d) for d in rng.integers(0, 10, size=n))


def synthetic_mask(rng: np.random.Generator, count: int, fraction: float) -> np.ndarray:
    mask = np.zeros(count, dtype=bool)
    mask[: int(round(count * fraction))] = True
    return rng.permutation(mask)


def plan_drop(
    plan: WeekPlan, demo: DemoConfig, count: int, fsdd: FsddRecordings, rng: np.random.Generator
) -> list[UtterancePlan]:
    """The ``count`` utterances of one weekly drop: speakers, voices and conditions drawn by the week's plan."""
    synthetic = synthetic_mask(rng, count, demo.synthetic_fraction)
    out: list[UtterancePlan] = []
    for i in range(count):
        utt_id = f"{plan.drop_id}-{i:05d}"
        digits = draw_digits(rng, demo)
        fmt = _FORMAT_SLOTS.get(i % _FORMAT_PERIOD, "wav")
        condition = draw_drop_condition(rng)
        if synthetic[i]:
            voice = _draw_voice(plan, rng)
            out.append(
                UtterancePlan(
                    utt_id=utt_id, digits=digits, speaker=speaker_of(voice), group=group_of(voice),
                    voice=draw_settings(rng, voice, odd_rate=False), render_seed=int(rng.integers(2**31 - 1)),
                    audio_format=fmt, condition=condition,
                )
            )
        else:
            speaker = plan.speakers[int(rng.choice(len(plan.speakers), p=plan.speaker_weights))]
            takes = tuple(int(rng.choice(fsdd.takes(d, speaker, DROP_TAKES))) for d in digits)
            out.append(
                UtterancePlan(
                    utt_id=utt_id, digits=digits, speaker=speaker, group=fsdd.accents[speaker], takes=takes,
                    render_seed=int(rng.integers(2**31 - 1)), audio_format=fmt, condition=condition,
                )
            )
    if plan.mislabelled_share > 0:
        out = mislabel(out, plan.mislabelled_share, rng)
    return out


def _draw_voice(plan: WeekPlan, rng: np.random.Generator) -> str:
    if plan.regular_voices and rng.random() < REGULAR_SHARE:
        return plan.regular_voices[int(rng.integers(len(plan.regular_voices)))]
    accent = plan.accents[int(rng.choice(len(plan.accents), p=plan.accent_weights))]
    return voice_name(accent, plan.variants[int(rng.integers(len(plan.variants)))])


def mislabel(plans: list[UtterancePlan], share: float, rng: np.random.Generator) -> list[UtterancePlan]:
    """``plans`` with ``share`` of them (at least 2 when ``share > 0``) given the transcript of
    another of them: the chosen ones pass their transcripts on in a cycle. Audio is unchanged."""
    k = min(len(plans), max(2, int(round(share * len(plans)))))
    if k < 2:
        return list(plans)
    chosen = sorted(int(i) for i in rng.choice(len(plans), size=k, replace=False))
    out = list(plans)
    for j, i in enumerate(chosen):
        donor = plans[chosen[(j + 1) % k]]
        out[i] = dataclasses.replace(plans[i], text_digits=donor.digits)
    return out
