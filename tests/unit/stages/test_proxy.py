"""Stratified proxy sampling: seeded, representative, disjoint train/dev, clear errors."""

from __future__ import annotations

import json
import math
import posixpath

import numpy as np
import pytest
from support.pool_factory import UttSpec, make_specs, write_pool

from pipeline.config import Config, ProxyConfig
from pipeline.run import RunContext
from pipeline.stages.proxy import apportion, apportion_balanced, compute_tvd, sample_proxy
from pipeline.storage import LocalStore

N_POOL = 400


def make_ctx(store: LocalStore, run_id: str, **proxy) -> RunContext:
    return RunContext(run_id=run_id, config=Config(proxy=ProxyConfig(**proxy)), store=store)


def read_jsonl(store: LocalStore, key: str) -> list[dict]:
    return [json.loads(line) for line in store.get_text(key).splitlines() if line.strip()]


def read_split(store: LocalStore, run_id: str) -> tuple[list[dict], list[dict]]:
    return (read_jsonl(store, f"runs/{run_id}/proxy/train.jsonl"),
            read_jsonl(store, f"runs/{run_id}/proxy/dev.jsonl"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LocalStore:
    """One pool for the module (400 WAV writes); each test samples under its own run ids."""
    store = LocalStore(tmp_path_factory.mktemp("pool") / "store")
    specs = make_specs(N_POOL - 2, speakers=8, groups=3, seed=1, min_s=0.3, max_s=4.0)
    rare = [UttSpec("rare0", "rare", "grp-rare", 0.5), UttSpec("rare1", "rare", "grp-rare", 3.5)]
    write_pool(store, [*specs, *rare])
    return store


def test_same_seed_same_proxy_other_seed_other_proxy(store):
    a = sample_proxy(make_ctx(store, "a"), seed=11)
    b = sample_proxy(make_ctx(store, "b"), seed=11)
    c = sample_proxy(make_ctx(store, "c"), seed=12)
    assert read_split(store, "a") == read_split(store, "b")
    ids = lambda run: {r["utt_id"] for r in read_split(store, run)[0]}  # noqa: E731
    assert ids("a") != ids("c")
    assert a["proxy_size"] == b["proxy_size"] == c["proxy_size"]


def test_every_speaker_group_and_stratum_is_kept_and_tvd_is_small(store):
    summary = sample_proxy(make_ctx(store, "strata"))
    train, dev = read_split(store, "strata")
    report = json.loads(store.get_text("runs/strata/proxy/report.json"))
    pool = read_jsonl(store, "state/pool/v1/manifest.jsonl")
    proxy = train + dev
    assert {r["speaker"] for r in proxy} == {r["speaker"] for r in pool}
    assert {r["group"] for r in proxy} == {r["group"] for r in pool}
    assert {r["utt_id"] for r in proxy} >= {"rare0", "rare1"}  # both duration buckets of a 2-utt speaker
    assert {r["speaker"] for r in train} == {r["speaker"] for r in pool}  # every stratum keeps a train utt
    for attribute in ("speaker", "group", "duration_bucket"):
        assert report["attributes"][attribute]["missing_in_proxy"] == []
        assert summary["tvd"][attribute] < 0.03, attribute
        assert report["attributes"][attribute]["tvd"]["train"] < 0.05
        counts = report["attributes"][attribute]["counts"]
        assert sum(counts["pool"].values()) == N_POOL
        assert sum(counts["proxy"].values()) == summary["proxy_size"]
    assert summary["pool_version"] == "v1" and summary["strata"] > 8


def test_train_and_dev_are_disjoint_and_sized_by_the_fractions(store):
    summary = sample_proxy(make_ctx(store, "sizes", fraction=0.3, dev_fraction=0.15))
    train, dev = read_split(store, "sizes")
    assert not {r["utt_id"] for r in train} & {r["utt_id"] for r in dev}
    assert not {r["sha256"] for r in train} & {r["sha256"] for r in dev}
    assert len(train) + len(dev) == summary["proxy_size"] == math.floor(0.3 * N_POOL + 0.5)
    assert len(dev) == summary["dev_size"] == math.floor(0.15 * summary["proxy_size"] + 0.5)
    assert summary["train_size"] == len(train)


def test_fraction_argument_overrides_config_and_one_takes_the_pool(store):
    assert sample_proxy(make_ctx(store, "half"), fraction=0.5)["proxy_size"] == N_POOL // 2
    everything = sample_proxy(make_ctx(store, "all"), fraction=1.0)
    assert everything["proxy_size"] == N_POOL and all(v == 0 for v in everything["tvd"].values())


def test_audio_paths_are_rewritten_relative_to_the_proxy_folder(store):
    sample_proxy(make_ctx(store, "paths"))
    for row in read_split(store, "paths")[1]:
        key = posixpath.normpath(posixpath.join("runs/paths/proxy", row["audio_filepath"]))
        assert key == f"state/audio/{row['sha256'][:2]}/{row['sha256']}.wav" and store.exists(key)


def test_rows_sharing_audio_stay_on_one_side(tmp_path):
    store = LocalStore(tmp_path / "s")
    rows = write_pool(store, make_specs(60, seed=2))
    dups = [{**r, "utt_id": r["utt_id"] + "-dup"} for r in rows[:30]]
    write_pool(store, [], version="v2", reuse_rows=rows + dups)
    sample_proxy(make_ctx(store, "r1", fraction=0.5))
    train, dev = read_split(store, "r1")
    assert not {r["sha256"] for r in train} & {r["sha256"] for r in dev}
    for part in (train, dev):
        shas = [r["sha256"] for r in part]
        assert all(shas.count(r["sha256"]) == 2 for r in part if r["utt_id"].endswith("-dup"))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "0.3", True])
def test_bad_fraction_is_a_clear_error(store, bad):
    with pytest.raises(ValueError, match=r"proxy fraction must be"):
        sample_proxy(make_ctx(store, "bad"), fraction=bad)
    assert not store.exists("runs/bad/proxy/_SUCCESS")


def test_too_small_a_proxy_says_raise_the_fraction(tmp_path):
    store = LocalStore(tmp_path / "s")
    write_pool(store, [UttSpec("only", "s", "g", 1.0)])
    with pytest.raises(ValueError, match="raise the proxy fraction"):
        sample_proxy(make_ctx(store, "r1"), fraction=0.5)


def test_finished_stage_is_skipped_but_other_parameters_are_refused(store):
    ctx = make_ctx(store, "again")
    assert sample_proxy(ctx)["skipped"] is False
    assert sample_proxy(ctx)["skipped"] is True
    with pytest.raises(ValueError, match="use a new run id"):
        sample_proxy(ctx, seed=99)


def test_apportion_keeps_minimum_and_total():
    rng = np.random.default_rng(0)
    assert apportion([100, 50, 1], 45, minimum=1, caps=[100, 50, 1], rng=rng) == [29, 15, 1]  # 29.8, 14.9, 0.3
    assert sum(apportion([10] * 7, 20, minimum=1, caps=[10] * 7, rng=rng)) == 20
    assert apportion([1] * 5, 2, minimum=1, caps=[1] * 5, rng=rng) == [1] * 5  # the minimum wins
    assert apportion([3, 3], 5, minimum=0, caps=[2, 2], rng=rng) == [2, 2]  # caps win


def test_balanced_apportioning_keeps_every_marginal_within_one_seat():
    keys = [(f"g{s % 2}", f"s{s}", f"q{b}") for s in range(6) for b in range(4)]
    counts = apportion_balanced(keys, [3] * 24, 14, caps=[2] * 24, rng=np.random.default_rng(0))
    assert sum(counts) == 14 and max(counts) <= 2
    for position, seats in ((0, 7), (1, 14 / 6), (2, 14 / 4)):
        per_value: dict[str, int] = {}
        for key, c in zip(keys, counts, strict=True):
            per_value[key[position]] = per_value.get(key[position], 0) + c
        assert all(abs(v - seats) < 1 for v in per_value.values()), (position, per_value)


def test_tvd():
    from collections import Counter

    assert compute_tvd(Counter(a=1, b=1), Counter(a=2, b=2)) == 0
    assert compute_tvd(Counter(a=1), Counter(b=1)) == 1
    assert compute_tvd(Counter(a=3, b=1), Counter(a=1, b=1)) == pytest.approx(0.25)
