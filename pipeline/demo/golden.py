"""The golden sets of the demo corpus, one recipe per version, and their ``meta.json``.

**v1** (300 utterances by default, ``demo.golden_utterances``): equal shares per FSDD speaker
and per eSpeak voice (three seen voices, one held out), the sound of
:func:`pipeline.demo.recordings.pad_and_level`, no ``condition`` field. Its code path is
kept as it was, so a v1 set is byte-identical for its seed.

**v2** (:data:`V2_UTTERANCES` = 1,490) and **v3** (:data:`V3_UTTERANCES` = 4,000), sized for the
gate, follow one recipe (:data:`RECIPES`) at two sizes: every FSDD speaker speaks
:attr:`Recipe.fsdd_utterances`, every voice in :data:`V2_SEEN_VOICES` and
:data:`V2_HELD_OUT_VOICES` :attr:`Recipe.voice_utterances`, and each speaker's utterances are
spread evenly over the four recording conditions of :mod:`pipeline.demo.conditions`,
``quiet`` (golden-only) included. So every group the gate checks (``speaker:*``, ``group:*``,
``cohort:*``, ``condition:*``) holds >= 70 utterances in v2 and >= 200 in v3,
``cohort:unseen`` holds george and the four held-out voices (a held-out accent,
en-gb-scotland, and held-out variants). In v2 the overall 95 % interval between two models of
the same quality (~10 % WER) is within +-2 points (simulated in tests/unit/demo/test_recipe.py:
about +-1.1 resampling utterances, +-1.5 resampling speakers, then their utterances). v3 is v2
scaled up for the gate's error rates (``tests/benchmarks/bench_gate.py``): ΔWER between two
retrains has a standard error of ~0.4 points on v2, above the 0.3 points that telling 0 from
+1 point at 5 % / 5 % needs; 2.7x the utterances bring it to ~0.25.
Each synthetic utterance draws its own rate (odd: drops use even ones), pitch, pitch range
and word gap.

Records carry ``"seen"``: the FSDD speaker or voice speaks in the drops from week 2 on
(v2's seen voices are regular drop voices, :data:`pipeline.demo.voices.REGULAR_VOICES`);
held-out ones never do. ``meta.json`` states the composition per group (utterances,
words, speakers), from which a report can say what differences the set can detect.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.config import DemoConfig
from pipeline.demo.conditions import CONDITIONS, GOLDEN_ONLY
from pipeline.demo.recordings import GOLDEN_TAKES, CorpusError, FsddRecordings
from pipeline.demo.schedule import (
    DROP_SPEAKERS,
    HELD_OUT_SPEAKERS,
    UtterancePlan,
    draw_digits,
    golden_rng,
    synthetic_mask,
)
from pipeline.demo.voices import (
    HELD_OUT_ACCENTS,
    HELD_OUT_VARIANTS,
    VoiceSettings,
    draw_settings,
    group_of,
    is_held_out,
    speaker_of,
)

GOLDEN_VERSIONS: tuple[str, ...] = ("v1", "v2", "v3")
GOLDEN_SPEAKERS: tuple[str, ...] = DROP_SPEAKERS + HELD_OUT_SPEAKERS

V1_SEEN_VOICES: tuple[str, ...] = ("en+m1", "en+f3", "en-us+m3")
V1_HELD_OUT_VOICES: tuple[str, ...] = ("en-gb-scotland+f4",)
_V1_RATES, _V1_PITCHES, _V1_COMMA_SHARE = (130, 210), (25, 75), 0.3

# v2: seen voices are regular drop voices (voices.REGULAR_VOICES) of weeks 1-2.
V2_SEEN_VOICES: tuple[str, ...] = (
    "en+m3", "en+f2", "en+klatt3", "en-us+m5", "en-us+f4", "en-gb-x-rp+m7", "en-gb-x-rp+f1", "en-029+m1",
)
V2_HELD_OUT_VOICES: tuple[str, ...] = ("en-gb-scotland+f4", "en-gb-scotland+m2", "en-us+Annie", "en-gb-x-rp+michel")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A conditions-era golden version (v2 on): utterances per FSDD speaker and per voice, its draws' stream."""

    fsdd_utterances: int
    voice_utterances: int
    rng_index: int

    @property
    def size(self) -> int:
        return self.fsdd_utterances * len(GOLDEN_SPEAKERS) + self.voice_utterances * (
            len(V2_SEEN_VOICES) + len(V2_HELD_OUT_VOICES))


RECIPES: dict[str, Recipe] = {"v2": Recipe(130, 70, 2), "v3": Recipe(320, 200, 3)}
V2_FSDD_UTTERANCES = RECIPES["v2"].fsdd_utterances  # per FSDD speaker
V2_VOICE_UTTERANCES = RECIPES["v2"].voice_utterances  # per voice
V2_UTTERANCES = RECIPES["v2"].size
V3_UTTERANCES = RECIPES["v3"].size
_V1_RNG_INDEX = 0
_ATTRIBUTION = (
    "Contains recordings from the Free Spoken Digit Dataset (Zohar Jackson and contributors, "
    "github.com/Jakobovski/free-spoken-digit-dataset), CC BY-SA 4.0, and speech synthesized "
    "with eSpeak NG."
)
_SEEN_MEANS = "the speaker or voice is in the drop schedule from week 2 on; held-out ones never are"
_SEEN_MEANS_V2 = (
    "the FSDD speaker, or the voice (a regular drop voice), speaks in the drops from week 2 on; held-out ones never do"
)


def check_version(version: str) -> None:
    if version not in GOLDEN_VERSIONS:
        raise CorpusError(
            f"unknown golden version {version!r}: this code builds {', '.join(GOLDEN_VERSIONS)}; "
            "set demo.golden_version to one of them"
        )


def default_size(version: str, demo: DemoConfig) -> int:
    """A version's number of utterances: v1 ``demo.golden_utterances``, v2 and v3 their recipe's size."""
    check_version(version)
    return demo.golden_utterances if version == "v1" else RECIPES[version].size


def held_out_voices(version: str) -> tuple[str, ...]:
    return V1_HELD_OUT_VOICES if version == "v1" else V2_HELD_OUT_VOICES


def plan_golden(version: str, demo: DemoConfig, count: int, fsdd: FsddRecordings, seed: int) -> list[UtterancePlan]:
    """The ``count`` utterances of golden ``version`` for ``seed``."""
    check_version(version)
    if count < 1:
        raise CorpusError(f"a golden set needs >= 1 utterance, got {count}")
    if version == "v1":
        return _plan_v1(demo, count, fsdd, golden_rng(seed, _V1_RNG_INDEX))
    return _plan_recipe(version, demo, count, fsdd, golden_rng(seed, RECIPES[version].rng_index))


def _v1_voice(rng: np.random.Generator, voice: str) -> VoiceSettings:
    rate = int(rng.integers(_V1_RATES[0] // 2, _V1_RATES[1] // 2 + 1)) * 2 + 1
    pitch = int(rng.integers(_V1_PITCHES[0], _V1_PITCHES[1] + 1))
    return VoiceSettings(voice=voice, rate=rate, pitch=pitch, pitch_range=50, word_gap=0, commas=False, volume=100)


def _plan_v1(demo: DemoConfig, count: int, fsdd: FsddRecordings, rng: np.random.Generator) -> list[UtterancePlan]:
    """Golden v1: equal shares per FSDD speaker and per voice, held-out ones included (unchanged draws)."""
    synthetic = synthetic_mask(rng, count, demo.synthetic_fraction)
    n_synth = int(synthetic.sum())
    voices = V1_SEEN_VOICES + V1_HELD_OUT_VOICES
    speaker_order = rng.permutation(np.arange(count - n_synth) % len(GOLDEN_SPEAKERS))
    voice_order = rng.permutation(np.arange(n_synth) % len(voices))
    out: list[UtterancePlan] = []
    k_spk = k_voice = 0
    for i in range(count):
        utt_id = f"golden-v1-{i:05d}"
        digits = draw_digits(rng, demo)
        if synthetic[i]:
            voice = voices[int(voice_order[k_voice])]
            k_voice += 1
            settings = _v1_voice(rng, voice)
            seed = int(rng.integers(2**31 - 1))
            commas = bool(np.random.default_rng(seed).random() < _V1_COMMA_SHARE)
            out.append(UtterancePlan(
                utt_id=utt_id, digits=digits, speaker=speaker_of(voice), group="synthetic",
                voice=dataclasses.replace(settings, commas=commas), render_seed=seed,
                seen=voice not in V1_HELD_OUT_VOICES,
            ))
        else:
            speaker = GOLDEN_SPEAKERS[int(speaker_order[k_spk])]
            k_spk += 1
            takes = tuple(int(rng.choice(fsdd.takes(d, speaker, GOLDEN_TAKES))) for d in digits)
            out.append(UtterancePlan(
                utt_id=utt_id, digits=digits, speaker=speaker, group=fsdd.accents[speaker], takes=takes,
                render_seed=int(rng.integers(2**31 - 1)), seen=speaker not in HELD_OUT_SPEAKERS,
            ))
    return out


def recipe_quotas(version: str, count: int) -> list[tuple[str, int]]:
    """(FSDD speaker or voice, utterances) of golden ``version`` (v2 on) at ``count`` utterances: its
    recipe's proportions (:attr:`Recipe.fsdd_utterances` : :attr:`Recipe.voice_utterances`), largest remainder."""
    recipe = RECIPES[version]
    who = list(GOLDEN_SPEAKERS) + list(V2_SEEN_VOICES) + list(V2_HELD_OUT_VOICES)
    voices = len(who) - len(GOLDEN_SPEAKERS)
    weights = np.array([recipe.fsdd_utterances] * len(GOLDEN_SPEAKERS) + [recipe.voice_utterances] * voices)
    exact = count * weights / weights.sum()
    quotas = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quotas), kind="stable")[: count - int(quotas.sum())]:
        quotas[i] += 1
    return list(zip(who, (int(q) for q in quotas), strict=True))


def _plan_recipe(version: str, demo: DemoConfig, count: int, fsdd: FsddRecordings,
                 rng: np.random.Generator) -> list[UtterancePlan]:
    """Golden v2/v3: fixed shares per speaker and voice, each spread evenly over the conditions, in random order."""
    names = list(CONDITIONS)
    slots: list[tuple[str, str]] = []
    for who, quota in recipe_quotas(version, count):
        slots += [(who, names[int(c)]) for c in rng.permutation(np.arange(quota) % len(names))]
    out: list[UtterancePlan] = []
    for i, j in enumerate(rng.permutation(len(slots))):
        who, condition = slots[int(j)]
        utt_id = f"golden-{version}-{i:05d}"
        digits = draw_digits(rng, demo)
        if who in GOLDEN_SPEAKERS:
            takes = tuple(int(rng.choice(fsdd.takes(d, who, GOLDEN_TAKES))) for d in digits)
            out.append(UtterancePlan(
                utt_id=utt_id, digits=digits, speaker=who, group=fsdd.accents[who], takes=takes,
                render_seed=int(rng.integers(2**31 - 1)), seen=who not in HELD_OUT_SPEAKERS, condition=condition,
            ))
        else:
            out.append(UtterancePlan(
                utt_id=utt_id, digits=digits, speaker=speaker_of(who), group=group_of(who),
                voice=draw_settings(rng, who, odd_rate=True), render_seed=int(rng.integers(2**31 - 1)),
                seen=not is_held_out(who), condition=condition,
            ))
    return out


def group_composition(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Utterances, words and speakers per group the gate checks (``speaker:``, ``group:``,
    ``cohort:``, ``condition:``) of manifest records."""
    utts: Counter = Counter()
    words: Counter = Counter()
    speakers: dict[str, set[str]] = {}
    for r in records:
        keys = [f"speaker:{r['speaker']}", f"group:{r['group']}"]
        if isinstance(r.get("seen"), bool):
            keys.append("cohort:seen" if r["seen"] else "cohort:unseen")
        if "condition" in r:
            keys.append(f"condition:{r['condition']}")
        for k in keys:
            utts[k] += 1
            words[k] += len(r["text"].split())
            speakers.setdefault(k, set()).add(r["speaker"])
    return {k: {"utterances": utts[k], "words": words[k], "speakers": len(speakers[k])} for k in sorted(utts)}


def _speakers(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    speakers: dict[str, dict[str, Any]] = {}
    for r in records:
        entry = speakers.setdefault(r["speaker"], {"group": r["group"], "seen": r["seen"], "utterances": 0})
        entry["utterances"] += 1
    return speakers


def golden_meta(
    version: str, records: Sequence[dict[str, Any]], seed: int, sample_rate: int, demo: DemoConfig
) -> dict[str, Any]:
    """The golden set's ``meta.json`` (v1's keys as they were; v2 and v3 add the composition per group)."""
    seen = sum(1 for r in records if r["seen"])
    meta: dict[str, Any] = {
        "attribution": _ATTRIBUTION,
        "digits": [demo.min_digits, demo.max_digits],
        "fsdd_takes": [GOLDEN_TAKES.start, GOLDEN_TAKES.stop - 1],
        "held_out_speakers": list(HELD_OUT_SPEAKERS),
        "held_out_voices": [speaker_of(v) for v in held_out_voices(version)],
        "sample_rate": sample_rate,
        "seed": seed,
        "seen_means": _SEEN_MEANS,
        "seen_utterances": seen,
        "speakers": _speakers(records),
        "synthetic_fraction": demo.synthetic_fraction,
        "unseen_utterances": len(records) - seen,
        "utterances": len(records),
        "version": version,
    }
    if version == "v1":
        return meta
    groups = group_composition(records)
    n_synth = sum(1 for r in records if r["speaker"].startswith("espeak-"))
    meta.update(
        conditions={c.name: _condition_meta(c.name) for c in CONDITIONS.values()},
        fsdd_recordings_per_speaker=len(GOLDEN_TAKES) * 10,
        groups=groups,
        held_out_accents=list(HELD_OUT_ACCENTS),
        held_out_variants=list(HELD_OUT_VARIANTS),
        min_group_utterances=min(g["utterances"] for g in groups.values()),
        reserved_conditions=list(GOLDEN_ONLY),
        seen_means=_SEEN_MEANS_V2,
        synthetic_fraction=round(n_synth / len(records), 4),
        words=sum(len(r["text"].split()) for r in records),
    )
    return meta


def _condition_meta(name: str) -> dict[str, Any]:
    c = CONDITIONS[name]
    return {
        "between_words": "exact zeros" if c.digital_silence else "noise floor",
        "dc_offset": c.dc_offset,
        "in_drops": name not in GOLDEN_ONLY,
        "peak_dbfs": list(c.peak_dbfs),
    }
