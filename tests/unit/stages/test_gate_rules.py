"""Gate rules as pure functions of per-utterance error counts (no models, no MLflow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.asr.metrics import UttScore, blockwise_bootstrap, holm_alphas, paired_bootstrap
from pipeline.config import GateConfig
from pipeline.stages.gate import check_force, failing_rules
from pipeline.stages.gate.rules import check_force_reason, decide
from pipeline.stages.gate.stage import read_cohorts, read_conditions

GROUPS = ("USA/neutral", "DEU/German", "BEL/French", "GRC/Greek")
WORDS = 5


def utts(rates: dict[str, float], *, per_group: int = 40, seed: int = 0, hyp: str = "h") -> list[UttScore]:
    """``per_group`` utterances per accent group (two speakers each) of 5 words, with errors drawn
    per utterance as Binomial(5, rate of the group): a realistic, noisy per-utterance profile."""
    rng = np.random.default_rng(seed)
    out = []
    for gi, group in enumerate(GROUPS):
        for i in range(per_group):
            e = int(rng.binomial(WORDS, rates[group]))
            out.append(UttScore(f"u{gi}-{i:03d}", f"spk{gi}{i % 2}", group, "one two three four five", hyp, e, WORDS, e, 20))
    return out


def uniform(rate: float) -> dict[str, float]:
    return {g: rate for g in GROUPS}


CFG = GateConfig(max_wer=0.5, min_group_utts=20, group_tolerance=0.03, max_rtf=0.5, bootstrap_resamples=1000)


def rules(outcome) -> dict[str, dict]:
    return {r["name"]: r for r in outcome.decision["rules"]}


def test_worse_candidate_fails():
    prod = utts(uniform(0.15), seed=1)
    cand = utts(uniform(0.30), seed=2)
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG)
    assert out.decision["passed"] is False
    r = rules(out)
    assert r["delta_wer"]["passed"] is False and r["delta_wer"]["ci_low"] > 0
    assert "delta_wer" in out.decision["failing_rules"]
    assert r["wer_ceiling"]["passed"] is True  # 30 % is under the 50 % ceiling: the relative rule caught it


def test_better_candidate_passes():
    prod = utts(uniform(0.30), seed=1)
    cand = utts(uniform(0.12), seed=2)
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG)
    assert out.decision["passed"] is True, out.decision["failing_rules"]
    assert out.decision["failing_rules"] == []
    r = rules(out)
    assert r["delta_wer"]["ci_high"] < 0
    assert set(r) == {"finite_outputs", "wer_ceiling", "rtf_budget", "coverage", "delta_wer", "worst_group"}
    assert out.decision["cold_start"] is False and out.decision["forced"] is False
    assert out.bootstrap is not None and len(out.bootstrap["samples"]) == CFG.bootstrap_resamples


def test_better_on_average_but_much_worse_for_one_group_fails_worst_group():
    prod = utts({"USA/neutral": 0.30, "DEU/German": 0.30, "BEL/French": 0.30, "GRC/Greek": 0.10}, seed=1)
    cand = utts({"USA/neutral": 0.08, "DEU/German": 0.08, "BEL/French": 0.08, "GRC/Greek": 0.35}, seed=2)
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG.model_copy(update={"mode": "non-regression"}))
    r = rules(out)
    assert r["delta_wer"]["passed"] is True and r["delta_wer"]["delta"] < 0  # better on average
    # two of eight speakers much worse: resampling speakers shows how unsure "better on average" is
    assert r["delta_wer"]["utt_ci_high"] < 0 < r["delta_wer"]["ci_high"]
    assert r["worst_group"]["passed"] is False
    assert out.decision["failing_rules"] == ["worst_group"]
    assert out.decision["passed"] is False
    failing = set(r["worst_group"]["failing_groups"])
    assert "group:GRC/Greek" in failing and {"speaker:spk30", "speaker:spk31"} <= failing
    assert r["worst_group"]["group"] in failing
    greek = next(g for g in out.decision["groups"] if g["key"] == "group:GRC/Greek")
    assert greek["checked"] and greek["passed"] is False and greek["ci_high"] > CFG.group_tolerance
    assert greek["verdict"] == "regression" and greek["ci_low"] > 0 and greek["confidence"] > CFG.confidence
    assert all(g["verdict"] != "regression" for g in out.decision["groups"] if g["delta"] < 0)


def test_small_groups_are_shown_not_checked():
    prod = utts({"USA/neutral": 0.30, "DEU/German": 0.30, "BEL/French": 0.30, "GRC/Greek": 0.10}, seed=1)
    cand = utts({"USA/neutral": 0.08, "DEU/German": 0.08, "BEL/French": 0.08, "GRC/Greek": 0.35}, seed=2)
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG.model_copy(update={"min_group_utts": 100}))
    assert rules(out)["worst_group"]["passed"] is True
    assert all(not g["checked"] for g in out.decision["groups"])
    # not silently passed: reported as too small to tell, with the smallest regression they could show
    assert all(g["verdict"] == "too small to tell" and g["passed"] is None and g["mde"] > 0
               for g in out.decision["groups"])
    assert len(rules(out)["worst_group"]["too_small_groups"]) == len(out.decision["groups"])


def test_cold_start_passes_on_absolute_rules_alone():
    cand = utts(uniform(0.2), seed=2)
    out = decide(cand, None, candidate_rtf=0.05, cfg=CFG)
    d = out.decision
    assert d["passed"] is True and d["cold_start"] is True
    assert {r["name"] for r in d["rules"]} == {"finite_outputs", "wer_ceiling", "rtf_budget"}
    assert all(r["kind"] == "absolute" for r in d["rules"])
    assert {s["name"] for s in d["skipped_rules"]} == {"coverage", "delta_wer", "worst_group"}
    assert d["bootstrap"] is None and out.bootstrap is None


def test_cold_start_still_fails_an_absolute_rule():
    out = decide(utts(uniform(0.7), seed=2), None, candidate_rtf=0.05, cfg=CFG)
    assert out.decision["passed"] is False and out.decision["failing_rules"] == ["wer_ceiling"]
    out = decide(utts(uniform(0.1), seed=2), None, candidate_rtf=0.9, cfg=CFG)
    assert out.decision["failing_rules"] == ["rtf_budget"]


def test_optional_group_ceiling_is_an_absolute_rule():
    cand = utts({"USA/neutral": 0.05, "DEU/German": 0.05, "BEL/French": 0.05, "GRC/Greek": 0.45}, seed=2)
    out = decide(cand, None, candidate_rtf=0.05, cfg=CFG.model_copy(update={"max_group_wer": 0.3}))
    r = rules(out)["group_wer_ceiling"]
    assert r["passed"] is False and r["kind"] == "absolute"
    assert r["group"] in ("group:GRC/Greek", "speaker:spk30", "speaker:spk31")


def test_nan_wer_fails():
    cand = [UttScore(f"u{i}", "s", "g", "", "", 0, 0, 0, 0) for i in range(30)]  # no reference words
    out = decide(cand, None, candidate_rtf=0.05, cfg=CFG)
    r = rules(out)["wer_ceiling"]
    assert r["passed"] is False and r["value"] is None and "NaN" in r["detail"]
    out = decide(utts(uniform(0.1)), None, candidate_rtf=math.nan, cfg=CFG)
    assert rules(out)["rtf_budget"]["passed"] is False
    json.dumps(out.decision, allow_nan=False)  # the decision file never holds NaN


def test_nan_group_against_production_fails():
    prod = utts(uniform(0.3), seed=1)
    cand = utts(uniform(0.1), seed=2)
    for u in prod + cand:  # one group has no reference words at all
        if u.group == "GRC/Greek":
            u.ref_words = 0
            u.errors = 0
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG)
    r = rules(out)["worst_group"]
    assert r["passed"] is False and "NaN" in r["detail"]
    json.dumps(out.decision, allow_nan=False)


def test_group_production_had_but_candidate_lacks_fails():
    prod = utts(uniform(0.3), seed=1)
    cand = [u for u in utts(uniform(0.1), seed=2) if u.group != "GRC/Greek"]
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG)
    r = rules(out)
    assert r["coverage"]["passed"] is False and r["coverage"]["value"] == 40
    assert r["worst_group"]["passed"] is False
    assert "group:GRC/Greek" in r["worst_group"]["failing_groups"]
    assert out.decision["passed"] is False


def test_improve_vs_non_regression_modes():
    prod = utts(uniform(0.2), seed=1)
    same = utts(uniform(0.2), seed=1)  # identical per-utterance errors: ΔWER = 0, CI [0, 0]
    improve = decide(same, prod, candidate_rtf=0.05, cfg=CFG)
    assert rules(improve)["delta_wer"]["passed"] is False  # a copy of production is not an improvement
    nonreg = decide(same, prod, candidate_rtf=0.05, cfg=CFG.model_copy(update={"mode": "non-regression", "tolerance": 0.005}))
    assert rules(nonreg)["delta_wer"]["passed"] is True
    assert nonreg.decision["passed"] is True and nonreg.decision["mode"] == "non-regression"
    slightly_worse = utts(uniform(0.24), seed=2)
    nonreg = decide(slightly_worse, prod, candidate_rtf=0.05, cfg=CFG.model_copy(update={"mode": "non-regression"}))
    assert rules(nonreg)["delta_wer"]["passed"] is False


def test_min_improvement_margin():
    prod = utts(uniform(0.30), seed=1)
    cand = utts(uniform(0.26), seed=2)
    strict = decide(cand, prod, candidate_rtf=0.05, cfg=CFG.model_copy(update={"min_improvement": 0.10}))
    r = rules(strict)["delta_wer"]
    assert r["threshold"] == -0.10 and r["passed"] is False


def test_bootstrap_is_seeded():
    prod, cand = utts(uniform(0.3), seed=1), utts(uniform(0.25), seed=2)
    a = decide(cand, prod, candidate_rtf=0.05, cfg=CFG)
    b = decide(cand, prod, candidate_rtf=0.05, cfg=CFG)
    assert a.decision["bootstrap"] == b.decision["bootstrap"]
    c = decide(cand, prod, candidate_rtf=0.05, cfg=CFG.model_copy(update={"seed": 5}))
    assert c.decision["bootstrap"]["ci_high"] != a.decision["bootstrap"]["ci_high"]


def test_force_needs_a_reason_and_is_recorded():
    prod, cand = utts(uniform(0.15), seed=1), utts(uniform(0.30), seed=2)
    for bad in ("", "   ", "\n"):
        with pytest.raises(ValueError, match="non-empty reason"):
            decide(cand, prod, candidate_rtf=0.05, cfg=CFG, force_reason=bad)
    with pytest.raises(ValueError):
        check_force_reason("")
    assert check_force_reason(None) is None
    default = decide(cand, prod, candidate_rtf=0.05, cfg=CFG)
    assert default.decision["forced"] is False and default.decision["passed"] is False  # never forced by default
    forced = decide(cand, prod, candidate_rtf=0.05, cfg=CFG, force_reason=" hotfix for outage 42 ", forced_by="alice")
    d = forced.decision
    assert d["passed"] is True and d["forced"] is True and d["rules_passed"] is False
    assert d["force_reason"] == "hotfix for outage 42" and d["forced_by"] == "alice"
    assert "delta_wer" in d["failing_rules"]  # the rules still say what they found


def test_check_force_needs_a_reason_only_when_forcing():
    for bad in (None, "", "  "):
        with pytest.raises(ValueError, match="force_promote needs force_reason"):
            check_force(True, bad)
    assert check_force(True, "INC-42: hotfix") == "INC-42: hotfix"
    assert check_force(False, "ignored without force_promote") is None
    assert check_force(False, None) is None


def test_failing_rules_names_what_did_not_pass():
    out = decide(utts(uniform(0.30), seed=2), utts(uniform(0.15), seed=1), candidate_rtf=0.05, cfg=CFG)
    assert failing_rules(out.decision) == out.decision["failing_rules"] and "delta_wer" in failing_rules(out.decision)
    assert failing_rules({"rules": [{"name": "a", "passed": True}, {"name": "b", "passed": False}]}) == ["b"]
    assert failing_rules({}) == []


def test_seen_and_unseen_are_separate_groups():
    prod, cand = utts(uniform(0.3), seed=1), utts(uniform(0.1), seed=2)
    cohorts = {u.utt_id: ("unseen" if u.group == "GRC/Greek" else "seen") for u in prod}
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG, cohorts=cohorts)
    keys = {g["key"]: g for g in out.decision["groups"]}
    assert keys["cohort:seen"]["n_utts"] == 120 and keys["cohort:unseen"]["n_utts"] == 40
    assert keys["cohort:unseen"]["checked"] is True


def test_read_cohorts_from_golden_manifest():
    text = "\n".join(json.dumps(r) for r in (
        {"utt_id": "a", "seen": True}, {"utt_id": "b", "seen": False}, {"utt_id": "c"},
    ))
    assert read_cohorts(text) == {"a": "seen", "b": "unseen"}


def test_gate_stage_refuses_an_empty_force_reason_before_any_work():
    from pipeline.stages.gate.stage import gate

    class NoCtx:  # any access would fail: the reason is checked first
        def __getattr__(self, name):
            raise AssertionError(f"touched ctx.{name}")

    with pytest.raises(ValueError, match="non-empty reason"):
        gate(NoCtx(), force_reason="  ")


def test_nonfinite_outputs_fail_even_when_the_transcripts_score_well():
    cand = utts(uniform(0.05))
    cand[3].finite = False  # one utterance's log-probs held a NaN
    out = decide(cand, None, candidate_rtf=0.1, cfg=CFG)
    assert out.decision["passed"] is False and out.decision["failing_rules"] == ["finite_outputs"]
    assert "1 of 160 utterances" in rules(out)["finite_outputs"]["detail"]
    forced = decide(cand, None, candidate_rtf=0.1, cfg=CFG, force_reason="known NaN on one clip, hotfix", forced_by="oncall")
    assert forced.decision["passed"] is True and forced.decision["forced"] is True


# --------------------------------------------------------------------------- issue 16: statistics of the gate


def paired_copy(prod: list[UttScore], *, flip: float, seed: int) -> list[UttScore]:
    """Production retrained: the same errors, except that a share ``flip`` of the utterances with errors
    gains or loses one (at random, mean zero): the noise of retraining on a fixed golden set."""
    rng = np.random.default_rng(seed)
    out = []
    for u in prod:
        e = u.errors
        if e > 0 and rng.random() < flip:
            e += 1 if rng.random() < 0.5 else -1
        out.append(UttScore(u.utt_id, u.speaker, u.group, u.reference, u.hypothesis, e, u.ref_words, e, u.ref_chars))
    return out


def with_extra_errors(base: list[UttScore], rate: float, *, group: str | None, seed: int) -> list[UttScore]:
    """``base`` with an extra error on each reference word with probability ``rate`` (in ``group`` only, if given)."""
    rng = np.random.default_rng(seed)
    out = []
    for u in base:
        e = u.errors + (int(rng.binomial(u.ref_words, rate)) if group in (None, u.group) else 0)
        out.append(UttScore(u.utt_id, u.speaker, u.group, u.reference, u.hypothesis, e, u.ref_words, e, u.ref_chars))
    return out


def test_blockwise_interval_is_wider_when_a_speakers_errors_are_correlated():
    # 8 speakers x 40 utterances; the candidate's change is shared by all utterances of a speaker
    # (some speakers +10 points, others -10): utterances of one speaker are not independent.
    rng = np.random.default_rng(3)
    speakers = np.repeat(np.arange(8), 40)
    words = np.full(len(speakers), WORDS)
    prod = rng.binomial(WORDS, 0.2, size=len(speakers))
    shift = np.where(np.arange(8) % 2 == 0, 0.10, -0.10)[speakers]
    cand = prod + rng.binomial(WORDS, np.abs(shift)) * np.sign(shift).astype(int)
    cand = np.maximum(cand, 0)
    block = blockwise_bootstrap(cand, prod, words, speakers, n_resamples=2000, seed=0)
    utt = paired_bootstrap(cand, prod, words, n_resamples=2000, seed=0)
    assert block["delta"] == utt["delta"]
    assert block["ci_high"] - block["ci_low"] > 1.5 * (utt["ci_high"] - utt["ci_low"])
    # independent utterances: the two agree (one block per utterance's own speaker is no different)
    iid = np.maximum(prod + rng.integers(-1, 2, size=len(prod)), 0)
    b2 = blockwise_bootstrap(iid, prod, words, speakers, n_resamples=2000, seed=0)
    u2 = paired_bootstrap(iid, prod, words, n_resamples=2000, seed=0)
    assert 0.7 < (b2["ci_high"] - b2["ci_low"]) / (u2["ci_high"] - u2["ci_low"]) < 1.4
    # the gate's decision shows both, and its rule uses the blockwise one
    scores = [UttScore(f"u{i}", f"s{speakers[i]}", "g", "r", "h", int(e), WORDS, int(e), 20) for i, e in enumerate(prod)]
    cands = [UttScore(u.utt_id, u.speaker, "g", "r", "h", int(e), WORDS, int(e), 20) for u, e in zip(scores, cand)]
    out = decide(cands, scores, candidate_rtf=0.05, cfg=CFG)
    d = out.decision
    assert d["bootstrap"]["method"] == "blockwise" and d["bootstrap_utterance"]["method"] == "utterance"
    assert (d["bootstrap"]["ci_high"] - d["bootstrap"]["ci_low"]) > (d["bootstrap_utterance"]["ci_high"]
                                                                      - d["bootstrap_utterance"]["ci_low"])
    assert rules(out)["delta_wer"]["ci_high"] == d["bootstrap"]["ci_high"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_group_with_a_real_15_point_regression_fails(seed):
    prod = utts(uniform(0.15), seed=10 + seed)
    base = paired_copy(prod, flip=0.05, seed=seed)
    cand = with_extra_errors(base, 0.15, group="GRC/Greek", seed=seed)  # +15 points for Greek only
    for mode in ("improve", "non-regression"):
        out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG.model_copy(update={"mode": mode}))
        greek = next(g for g in out.decision["groups"] if g["key"] == "group:GRC/Greek")
        assert greek["verdict"] == "regression" and greek["passed"] is False, greek
        assert 0.10 < greek["delta"] < 0.20 and greek["ci_low"] > 0
        assert "group:GRC/Greek" in rules(out)["worst_group"]["failing_groups"]
        assert out.decision["passed"] is False


def test_a_group_that_improved_never_fails():
    for seed in range(25):
        prod = utts(uniform(0.25), seed=100 + seed)
        cand = utts({**uniform(0.25), "DEU/German": 0.10}, seed=200 + seed)  # German improved by 15 points
        out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG.model_copy(update={"mode": "non-regression"}))
        for g in out.decision["groups"]:
            if g["key"] in ("group:DEU/German", "speaker:spk10", "speaker:spk11"):
                assert g["verdict"] != "regression" and g["passed"] is not False and not g["above_zero"], (seed, g)
                assert g["key"] not in rules(out)["worst_group"]["failing_groups"]
        german = next(g for g in out.decision["groups"] if g["key"] == "group:DEU/German")
        assert german["delta"] < 0 and german["verdict"] in ("no evidence of regression", "too small to tell")


def test_a_copy_of_production_passes_non_regression_and_fails_improve():
    nonreg = CFG.model_copy(update={"mode": "non-regression"})
    improve = CFG.model_copy(update={"mode": "improve"})
    passed = {"non-regression": 0, "improve": 0}
    group_failures = 0
    runs = 20
    for seed in range(runs):
        prod = utts(uniform(0.15), seed=300 + seed, per_group=60)
        copy = paired_copy(prod, flip=0.04, seed=seed)
        for name, cfg in (("non-regression", nonreg), ("improve", improve)):
            out = decide(copy, prod, candidate_rtf=0.05, cfg=cfg)
            passed[name] += out.decision["passed"]
            group_failures += not rules(out)["worst_group"]["passed"]
    assert passed["non-regression"] >= 0.9 * runs, passed
    assert passed["improve"] == 0, passed
    # 12 groups tested at once, Holm-adjusted: a copy of production (almost) never fails one
    assert group_failures <= 1
    identical = decide(prod, prod, candidate_rtf=0.05, cfg=nonreg)
    assert identical.decision["passed"] is True
    assert decide(prod, prod, candidate_rtf=0.05, cfg=improve).decision["failing_rules"] == ["delta_wer"]


def test_non_regression_fails_a_regression_above_the_tolerance_or_with_evidence():
    prod = utts(uniform(0.15), seed=1, per_group=80)
    nonreg = CFG.model_copy(update={"mode": "non-regression", "tolerance": 0.005})
    worse = with_extra_errors(prod, 0.03, group=None, seed=2)  # 3 points worse everywhere
    r = rules(decide(worse, prod, candidate_rtf=0.05, cfg=nonreg))["delta_wer"]
    assert r["passed"] is False and r["ci_low"] > 0 and r["value"] == r["delta"] > 0.005


def test_holm_levels_and_the_step_down():
    assert holm_alphas([0.5, 0.01, math.nan, 0.02], 0.05) == [0.05 / 2, 0.05 / 4, 0.05, 0.05 / 3]
    prod = utts(uniform(0.15), seed=5)
    cand = with_extra_errors(paired_copy(prod, flip=0.05, seed=5), 0.20, group="GRC/Greek", seed=5)
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG)
    family = sorted((g for g in out.decision["groups"] if g["checked"]), key=lambda g: (g["p_value"], g["key"]))
    m = len(family)
    assert family[0]["confidence"] == pytest.approx(1 - 0.05 / m)  # rank 1: Bonferroni
    assert all(a["confidence"] >= b["confidence"] for a, b in zip(family, family[1:]))
    assert {g["key"] for g in family if g["above_zero"]} == {"group:GRC/Greek", "speaker:spk30", "speaker:spk31"}
    assert out.decision["detectability"]["family_size"] == m


def test_condition_groups_from_the_golden_manifest():
    prod, cand = utts(uniform(0.2), seed=1), utts(uniform(0.2), seed=2)
    conditions = {u.utt_id: ("noisy" if i % 2 else "clean") for i, u in enumerate(prod)}
    out = decide(cand, prod, candidate_rtf=0.05, cfg=CFG, conditions=conditions)
    keys = {g["key"]: g for g in out.decision["groups"]}
    assert keys["condition:noisy"]["n_utts"] == 80 and keys["condition:clean"]["checked"] is True
    text = "\n".join(json.dumps(r) for r in (
        {"utt_id": "a", "condition": "telephone"}, {"utt_id": "b", "condition": ""}, {"utt_id": "c", "seen": True},
    ))
    assert read_conditions(text) == {"a": "telephone"}
    assert read_conditions(json.dumps({"utt_id": "x", "seen": False})) == {}  # golden v1: no condition groups
    v1 = decide(cand, prod, candidate_rtf=0.05, cfg=CFG, conditions=read_conditions(""))
    assert not any(g["kind"] == "condition" for g in v1.decision["groups"])


def test_the_decision_states_what_the_golden_set_can_detect():
    prod = utts(uniform(0.15), seed=1)
    out = decide(paired_copy(prod, flip=0.05, seed=1), prod, candidate_rtf=0.05, cfg=CFG)
    det = out.decision["detectability"]
    assert 0 < det["regression_mde"] < det["improvement_mde"] < 0.2
    assert set(det["group_mde"]) == {g["key"] for g in out.decision["groups"]}
    small = out.decision["groups"][0]
    assert small["mde"] >= CFG.group_tolerance
    json.dumps(out.decision, allow_nan=False)
