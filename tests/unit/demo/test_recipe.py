"""The demo corpus's recipe without building it: voices (pipeline.demo.voices), recording
conditions (pipeline.demo.conditions), the drop schedule's bad-drop hook and golden v2's plan
at full size (pipeline.demo.golden)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from pipeline.asr.metrics import paired_bootstrap
from pipeline.config import DemoConfig
from pipeline.demo.conditions import (
    CONDITIONS,
    DROP_SHARES,
    GOLDEN_ONLY,
    apply_condition,
    draw_drop_condition,
    noise_gate,
)
from pipeline.demo.golden import (
    GOLDEN_SPEAKERS,
    V1_SEEN_VOICES,
    V2_FSDD_UTTERANCES,
    V2_HELD_OUT_VOICES,
    V2_SEEN_VOICES,
    V2_UTTERANCES,
    V2_VOICE_UTTERANCES,
    V3_UTTERANCES,
    group_composition,
    plan_golden,
    recipe_quotas,
)
from pipeline.demo.recordings import GOLDEN_TAKES, FsddRecordings
from pipeline.demo.schedule import BAD_DROPS, drop_rng, mislabel, plan_drop, plan_week
from pipeline.demo.tts import TtsError, synthesize
from pipeline.demo.voices import (
    DROP_ACCENTS,
    HELD_OUT_ACCENTS,
    REGULAR_VOICES,
    VARIANT_FAMILIES,
    draw_settings,
    is_held_out,
)

SR = 8000


@pytest.fixture(scope="module")
def fsdd() -> FsddRecordings:
    demo = DemoConfig()
    if not demo.fsdd_path().is_dir():
        pytest.skip(f"FSDD recordings not found at {demo.fsdd_path()} (set demo.fsdd_dir)")
    return FsddRecordings(demo.fsdd_path(), SR, GOLDEN_SPEAKERS)


@pytest.fixture(scope="module")
def v2_records(fsdd) -> list[dict]:
    """Golden v2 at full size as manifest-like records (planned, not rendered)."""
    plans = plan_golden("v2", DemoConfig(), V2_UTTERANCES, fsdd, seed=1234)
    return [
        {"speaker": u.speaker, "group": u.group, "seen": u.seen, "condition": u.condition, "text": u.text,
         "takes": u.takes}
        for u in plans
    ]


def speech_with_gaps() -> np.ndarray:
    """0.1 s silence, 0.3 s tone, 0.2 s silence, 0.3 s tone, 0.1 s silence."""
    t = np.arange(int(0.3 * SR)) / SR
    tone = 0.5 * np.sin(2 * np.pi * 300 * t)
    z = np.zeros
    return np.concatenate([z(int(0.1 * SR)), tone, z(int(0.2 * SR)), tone, z(int(0.1 * SR))])


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_apply_condition_gives_the_condition_its_level_silence_and_offset(name):
    cond = CONDITIONS[name]
    for seed in range(20):
        x = apply_condition(speech_with_gaps(), SR, name, np.random.default_rng(seed))
        offset = float(x[: int(0.08 * SR)].mean())
        speech_peak = float(np.abs(x - offset).max())
        lo, hi = cond.peak_dbfs
        assert lo - 0.5 <= 20 * np.log10(speech_peak) <= hi + 0.5
        gap = x[int(0.45 * SR) : int(0.55 * SR)]
        if cond.digital_silence:
            assert not gap.any()
        else:
            assert np.count_nonzero(gap) == gap.size
        assert (abs(offset) >= 0.005) is cond.dc_offset
        assert np.abs(x).max() < 1.0


def test_quiet_is_golden_only_and_below_every_drop_level():
    assert set(GOLDEN_ONLY) == {"quiet"} and "quiet" not in DROP_SHARES
    assert abs(sum(DROP_SHARES.values()) - 1) < 1e-9
    rng = np.random.default_rng(0)
    drawn = Counter(draw_drop_condition(rng) for _ in range(4000))
    assert set(drawn) == set(DROP_SHARES)
    for name, share in DROP_SHARES.items():
        assert abs(drawn[name] / 4000 - share) < 0.03
    quiet_top = CONDITIONS["quiet"].peak_dbfs[1]
    assert all(CONDITIONS[n].peak_dbfs[0] > quiet_top + 1 for n in DROP_SHARES)


def test_noise_gate_zeroes_long_quiet_runs_and_keeps_short_dips():
    x = speech_with_gaps()
    x[int(0.2 * SR) : int(0.2 * SR) + int(0.015 * SR)] *= 1e-4  # a 15 ms dip inside the first tone
    x += 1e-4  # a faint floor everywhere
    gated = noise_gate(x, SR)
    assert not gated[int(0.42 * SR) : int(0.58 * SR)].any()
    assert gated[int(0.2 * SR) : int(0.2 * SR) + int(0.015 * SR)].all()  # too short to gate
    assert np.array_equal(gated[int(0.15 * SR) : int(0.35 * SR)], x[int(0.15 * SR) : int(0.35 * SR)])


def test_every_voice_of_the_recipe_is_in_the_bundled_espeak_data():
    voices = set(plan_week(52).voices) | set(V2_SEEN_VOICES) | set(V2_HELD_OUT_VOICES)
    assert len(voices) > 200
    for accent in DROP_ACCENTS + HELD_OUT_ACCENTS:
        for family in VARIANT_FAMILIES.values():
            voices.add(f"{accent}+{family[0]}")
    for voice in sorted(voices):
        wave, _ = synthesize("one", voice)  # raises TtsError for an unknown accent or variant
        assert wave.size
    with pytest.raises(TtsError, match="unknown eSpeak NG voice variant"):
        synthesize("one", "en+no-such-variant")


def test_voice_settings_vary_and_keep_the_rate_parity():
    rng = np.random.default_rng(3)
    drawn = [draw_settings(rng, "en+m3", odd_rate=odd) for odd in (False, True) * 200]
    assert all(s.rate % 2 == (i % 2) for i, s in enumerate(drawn))
    for attr in ("rate", "pitch", "pitch_range", "word_gap", "commas"):
        assert len({getattr(s, attr) for s in drawn}) > 1, attr
    gap, _ = synthesize("four one five", "en+m3", word_gap=12)
    plain, _ = synthesize("four one five", "en+m3")
    assert gap.size > plain.size + 0.15 * 22050  # two gaps of 120 ms
    with pytest.raises(TtsError, match="pitch_range"):
        synthesize("one", "en", pitch_range=101)


def test_held_out_voices_are_accent_or_variant_held_out():
    assert all(is_held_out(v) for v in V2_HELD_OUT_VOICES)
    assert not any(is_held_out(v) for v in V2_SEEN_VOICES)
    assert set(V2_SEEN_VOICES) <= set(plan_week(2).regular_voices) <= set(plan_week(2).voices)
    assert set(V1_SEEN_VOICES) | set(V2_SEEN_VOICES) == set(REGULAR_VOICES)
    assert set(plan_week(1).regular_voices) == set(REGULAR_VOICES) - {"en+klatt3", "en-029+m1"}  # week-2 arrivals


def test_mislabel_moves_transcripts_between_utterances_only(fsdd):
    plans = plan_drop(plan_week(2), DemoConfig(), 40, fsdd, drop_rng(1, 2))
    bad = mislabel(plans, 0.1, np.random.default_rng(0))
    changed = [i for i, (a, b) in enumerate(zip(plans, bad)) if a != b]
    assert len(changed) == 4
    assert sorted(bad[i].text for i in changed) == sorted(plans[i].text for i in changed)
    assert all(bad[i].digits == plans[i].digits and bad[i].render_seed == plans[i].render_seed for i in changed)
    clean = plan_drop(plan_week(2), DemoConfig(), 40, fsdd, drop_rng(1, 2))
    assert clean == plans  # a clean week (mislabelled_share 0) is unaffected by the hook
    week = dataclasses.replace(plan_week(2), mislabelled_share=0.25)
    marked = plan_drop(week, DemoConfig(), 40, fsdd, drop_rng(1, 2))
    assert sum(u.text_digits is not None for u in marked) == 10
    assert [u.digits for u in marked] == [u.digits for u in plans]  # the audio is what it was


def test_week_3_is_the_recipes_bad_drop(fsdd):
    assert [plan_week(w).mislabelled_share for w in (1, 2, 4)] == [0.0, 0.0, 0.0]
    assert plan_week(3).mislabelled_share == BAD_DROPS[3] >= 0.5
    plans = plan_drop(plan_week(3), DemoConfig(), 100, fsdd, drop_rng(1, 3))
    wrong = [u for u in plans if u.text_digits is not None and u.text_digits != u.digits]
    assert len(wrong) >= 50  # most of the marked ones now say other digits than their audio


def test_golden_v2_at_full_size_gives_every_checked_group_60_utterances(v2_records):
    assert len(v2_records) == V2_UTTERANCES >= 1000
    groups = group_composition(v2_records)
    assert {k.split(":")[0] for k in groups} == {"speaker", "group", "cohort", "condition"}
    assert min(g["utterances"] for g in groups.values()) >= 60, groups
    assert groups["cohort:unseen"]["speakers"] >= 2
    assert set(k for k in groups if k.startswith("condition:")) == {f"condition:{c}" for c in CONDITIONS}
    per_speaker = Counter((r["speaker"], r["condition"]) for r in v2_records)
    assert min(per_speaker.values()) >= 15 and len(per_speaker) == 4 * len({r["speaker"] for r in v2_records})
    assert all(t in GOLDEN_TAKES for r in v2_records for t in r["takes"])
    assert {n for w, n in recipe_quotas("v2", V2_UTTERANCES) if w in GOLDEN_SPEAKERS} == {V2_FSDD_UTTERANCES}
    assert {n for w, n in recipe_quotas("v2", V2_UTTERANCES) if w not in GOLDEN_SPEAKERS} == {V2_VOICE_UTTERANCES}
    assert sum(n for _, n in recipe_quotas("v2", 137)) == 137


def test_golden_v3_is_v2s_recipe_at_4000_utterances_with_every_checked_group_200(fsdd, v2_records):
    plans = plan_golden("v3", DemoConfig(), V3_UTTERANCES, fsdd, seed=1234)
    records = [{"speaker": u.speaker, "group": u.group, "seen": u.seen, "condition": u.condition, "text": u.text}
               for u in plans]
    groups, v2_groups = group_composition(records), group_composition(v2_records)
    assert len(records) == V3_UTTERANCES == 4000 and set(groups) == set(v2_groups)
    assert min(g["utterances"] for g in groups.values()) >= 200, groups
    assert {k: g["speakers"] for k, g in groups.items()} == {k: g["speakers"] for k, g in v2_groups.items()}
    assert plans[0].utt_id == "golden-v3-00000" and len({u.utt_id for u in plans}) == len(plans)
    # its own draws: not v2's utterances again
    v2_texts = [r["text"] for r in v2_records]
    assert [r["text"] for r in records[: len(v2_texts)]] != v2_texts


def blockwise_half_width(a: np.ndarray, b: np.ndarray, words: np.ndarray, speakers: list[str], n: int = 400) -> float:
    """Half the 95 % interval of WER(a) - WER(b), resampling speakers, then each one's utterances."""
    rng = np.random.default_rng(2)
    blocks = [np.array([i for i, s in enumerate(speakers) if s == k]) for k in sorted(set(speakers))]
    deltas = []
    for _ in range(n):
        idx = np.concatenate([blocks[k][rng.integers(0, blocks[k].size, blocks[k].size)]
                              for k in rng.integers(0, len(blocks), len(blocks))])
        deltas.append((a[idx].sum() - b[idx].sum()) / words[idx].sum())
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    return float(hi - lo) / 2


def test_golden_v2_overall_interval_between_comparable_models_is_within_2_points(v2_records):
    """Two models of the same quality (~10 % WER, varying by speaker and utterance, errors
    independent given the utterance): the 95 % interval of their difference is at most +-2 pts,
    resampling utterances (paired bootstrap) or speakers first (blockwise)."""
    rng = np.random.default_rng(0)
    words = np.array([len(r["text"].split()) for r in v2_records])
    speakers = sorted({r["speaker"] for r in v2_records})
    speaker_wer = dict(zip(speakers, rng.uniform(0.03, 0.25, size=len(speakers)), strict=True))
    p = np.array([speaker_wer[r["speaker"]] for r in v2_records]) * rng.gamma(2.0, 0.5, size=len(words))
    p = np.clip(p, 0.0, 0.9)
    a, b = rng.binomial(words, p), rng.binomial(words, p)
    boot = paired_bootstrap(a, b, words, seed=1)
    assert 0.07 < a.sum() / words.sum() < 0.15
    assert (boot["ci_high"] - boot["ci_low"]) / 2 <= 0.02, boot
    assert blockwise_half_width(a, b, words, [r["speaker"] for r in v2_records]) <= 0.02
