"""A small, representative proxy of the training pool for hyper-parameter search.

**Strata.** Every recording of the current pool falls in one stratum: (group, speaker,
duration bucket). Duration buckets are the pool's quartiles (``n_buckets=4``): bucket
``q1`` holds durations up to the 25th percentile, ``q4`` those above the 75th. A
recording is one audio sha256: records sharing audio are sampled together, so no
recording ever sits in both train and dev (nor an utterance id, unique in the pool).

**Sizes and rounding.** The proxy takes ``round(fraction × recordings)`` recordings
(halves round up), apportioned to strata by the largest-remainder method: each stratum
first gets ``floor(fraction × its size)`` but at least 1, then the seats left go to the
strata with the largest fractional remainders (ties broken by the seed). The minimum of
1 wins over the total: with more strata than seats, the proxy is larger than asked
(``effective_fraction`` in the summary says by how much). ``fraction=1`` takes the pool.

The dev split takes ``dev_fraction`` of the proxy's recordings (at least 1), given out
one at a time to the stratum whose group, speaker and bucket are furthest below their
proportional share (:func:`apportion_balanced`), so even a small dev set is balanced on
all three attributes at once. There is no minimum per stratum, and a stratum's last
proxy recording is never taken: every stratum keeps at least one training recording.

**Determinism.** Each stratum draws from its own generator seeded by (seed, stratum
name), over its recordings in utterance-id order: one seed gives one proxy, whatever the
line order of the manifest, and a stratum's draw does not move when other strata change.

**Outputs** under ``runs/{run_id}/proxy/``: ``train.jsonl`` and ``dev.jsonl`` (the pool's
records, ``audio_filepath`` rewritten relative to that folder) and ``report.json``: for speaker,
group and duration bucket the counts in pool, proxy, train and dev and the total-variation
distance ``½ Σ|p − q|`` of each against the pool.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.data.manifest import Utterance, relative_audio_path, write_manifest
from pipeline.data.pool import Pool, read_pool
from pipeline.run import RunContext

PROXY_STAGE = "proxy"
ATTRIBUTES = ("speaker", "group", "duration_bucket")


@dataclass
class _Recording:
    """Utterances sharing one audio sha256; sampled as a unit."""

    sha256: str
    utterances: list[Utterance]
    stratum: tuple[str, str, str]  # (group, speaker, duration bucket)
    bucket: str


def check_fraction(name: str, value: float, *, allow_one: bool) -> float:
    upper = "1]" if allow_one else "1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in (0, {upper}, got {value!r}")
    if not (0 < value < 1 or (allow_one and value == 1)):
        raise ValueError(f"{name} must be in (0, {upper}, got {value!r}; e.g. 0.3 for a 30% proxy")
    return float(value)


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def compute_bucket_edges(durations: Sequence[float], n_buckets: int = 4) -> list[float]:
    """Inner quantile edges of ``durations`` (3 edges for quartiles)."""
    qs = [i / n_buckets for i in range(1, n_buckets)]
    return [float(e) for e in np.quantile(np.asarray(durations, dtype=np.float64), qs)]


def assign_bucket(duration: float, edges: Sequence[float]) -> str:
    return f"q{int(np.searchsorted(edges, duration, side='left')) + 1}"


def apportion(sizes: Sequence[int], total: int, *, minimum: int, caps: Sequence[int],
              rng: np.random.Generator) -> list[int]:
    """Split ``total`` seats over strata of ``sizes`` in proportion (largest remainder).

    Each stratum gets at least ``min(minimum, cap)`` and at most its ``cap``; the
    minimum may push the sum above ``total``. Ties in remainders are broken by ``rng``.
    """
    n = sum(sizes)
    quotas = [total * s / n if n else 0.0 for s in sizes]
    counts = [min(cap, max(minimum, math.floor(q))) for q, cap in zip(quotas, caps, strict=True)]
    left = total - sum(counts)
    if left <= 0:
        return counts
    tiebreak = rng.permutation(len(sizes))
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), tiebreak[i]))
    for i in order:  # largest remainders first, each stratum up to its quota rounded up
        if left and counts[i] < min(caps[i], math.ceil(quotas[i])):
            counts[i] += 1
            left -= 1
    while left > 0 and any(c < cap for c, cap in zip(counts, caps, strict=True)):  # caps bit: spread the rest
        for i in order:
            if left and counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
    return counts


def compute_tvd(pool: Counter, sample: Counter) -> float:
    """Total-variation distance between two count distributions."""
    n_pool, n_sample = sum(pool.values()), sum(sample.values())
    if not n_pool or not n_sample:
        return 1.0 if n_pool != n_sample else 0.0
    keys = set(pool) | set(sample)
    return 0.5 * sum(abs(pool[k] / n_pool - sample[k] / n_sample) for k in keys)


def _stratum_rng(seed: int, stratum: tuple[str, ...]) -> np.random.Generator:
    name = json.dumps(stratum)
    return np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)])


def apportion_balanced(keys: Sequence[tuple[str, ...]], sizes: Sequence[int], total: int, *,
                       caps: Sequence[int], rng: np.random.Generator) -> list[int]:
    """Split ``total`` seats over strata so each attribute's marginal stays proportional.

    ``keys[i]`` holds stratum ``i``'s attribute values (group, speaker, bucket). Seats are
    given one at a time to the stratum whose attribute values (and itself) are furthest
    below their proportional share, ties broken by ``rng``. With few seats (a small dev
    split) this keeps groups, speakers and buckets balanced at once, which rounding stratum
    by stratum does not.
    """
    n = sum(sizes)
    n_attrs = len(keys[0]) if keys else 0
    target = [defaultdict(float) for _ in range(n_attrs)]
    for key, size in zip(keys, sizes, strict=True):
        for a in range(n_attrs):
            target[a][key[a]] += total * size / n
    taken = [defaultdict(int) for _ in range(n_attrs)]
    counts = [0] * len(keys)
    tiebreak = rng.permutation(len(keys))
    for _ in range(total):
        best, best_score = -1, (-math.inf, 0)
        for i, key in enumerate(keys):
            if counts[i] >= caps[i]:
                continue
            deficit = sum(target[a][key[a]] - taken[a][key[a]] for a in range(n_attrs))
            score = (deficit + total * sizes[i] / n - counts[i], -int(tiebreak[i]))
            if score > best_score:
                best, best_score = i, score
        if best < 0:
            break
        counts[best] += 1
        for a in range(n_attrs):
            taken[a][keys[best][a]] += 1
    return counts


def group_recordings(pool: Pool, n_buckets: int = 4) -> tuple[list[_Recording], list[float]]:
    """The pool's recordings with their stratum, and the duration-bucket edges used."""
    by_sha: dict[str, list[Utterance]] = defaultdict(list)
    for utt in pool.utterances:
        by_sha[utt.sha256].append(utt)
    groups = [sorted(utts, key=lambda u: u.utt_id) for utts in by_sha.values()]
    edges = compute_bucket_edges([utts[0].duration for utts in groups], n_buckets)
    recordings = []
    for utts in sorted(groups, key=lambda us: us[0].utt_id):
        head = utts[0]
        bucket = assign_bucket(head.duration, edges)
        stratum = (head.group, head.speaker, bucket)
        recordings.append(_Recording(sha256=head.sha256, utterances=utts, stratum=stratum, bucket=bucket))
    return recordings, edges


def split_proxy(recordings: list[_Recording], *, fraction: float, dev_fraction: float,
                seed: int) -> tuple[list[_Recording], list[_Recording]]:
    """Stratified seeded sample of ``recordings``, split into (train, dev)."""
    strata: dict[tuple[str, str, str], list[_Recording]] = defaultdict(list)
    for rec in recordings:
        strata[rec.stratum].append(rec)
    names = sorted(strata)
    shuffled = {}
    for name in names:
        members = strata[name]
        shuffled[name] = [members[i] for i in _stratum_rng(seed, name).permutation(len(members))]
    sizes = [len(strata[n]) for n in names]
    rng = np.random.default_rng(seed)
    take = apportion(sizes, round_half_up(fraction * len(recordings)), minimum=1, caps=sizes, rng=rng)
    proxy_size = sum(take)
    if proxy_size < 2:
        raise ValueError(
            f"the proxy would hold {proxy_size} recording(s) of {len(recordings)}; "
            "a train/dev split needs at least 2: raise the proxy fraction"
        )
    dev_total = max(1, round_half_up(dev_fraction * proxy_size))
    dev_counts = apportion_balanced(names, take, dev_total, caps=[max(0, t - 1) for t in take], rng=rng)
    if sum(dev_counts) == 0:
        raise ValueError(
            "every stratum of the proxy holds a single recording, so none can go to dev without leaving "
            "its stratum out of train: raise the proxy fraction"
        )
    train: list[_Recording] = []
    dev: list[_Recording] = []
    for name, t, d in zip(names, take, dev_counts, strict=True):
        chosen = shuffled[name][:t]
        dev.extend(chosen[:d])
        train.extend(chosen[d:])
    return train, dev


def _utterances(recordings: list[_Recording]) -> list[Utterance]:
    return sorted((u for rec in recordings for u in rec.utterances), key=lambda u: u.utt_id)


def _distribution(recordings: list[_Recording], attribute: str) -> Counter:
    counts: Counter = Counter()
    for rec in recordings:
        value = rec.bucket if attribute == "duration_bucket" else getattr(rec.utterances[0], attribute)
        counts[str(value)] += len(rec.utterances)
    return counts


def build_report(recordings: list[_Recording], train: list[_Recording], dev: list[_Recording]) -> dict[str, Any]:
    parts = {"pool": recordings, "proxy": train + dev, "train": train, "dev": dev}
    report: dict[str, Any] = {}
    for attribute in ATTRIBUTES:
        counts = {name: _distribution(recs, attribute) for name, recs in parts.items()}
        report[attribute] = {
            "counts": {name: dict(sorted(c.items())) for name, c in counts.items()},
            "tvd": {name: round(compute_tvd(counts["pool"], counts[name]), 6) for name in ("proxy", "train", "dev")},
            "missing_in_proxy": sorted(set(counts["pool"]) - set(counts["proxy"])),
        }
    return report


def sample_proxy(ctx: RunContext, *, fraction: float | None = None, seed: int | None = None) -> dict[str, Any]:
    """Stage: a seeded, stratified proxy of the current pool with its own dev split."""
    fraction = check_fraction("proxy fraction", ctx.config.proxy.fraction if fraction is None else fraction,
                              allow_one=True)
    dev_fraction = check_fraction("proxy dev_fraction", ctx.config.proxy.dev_fraction, allow_one=False)
    seed = ctx.config.proxy.seed if seed is None else int(seed)
    if ctx.is_complete(PROXY_STAGE):
        done = ctx.summary(PROXY_STAGE)
        asked = {"fraction": fraction, "dev_fraction": dev_fraction, "seed": seed}
        if any(done.get(k) != v for k, v in asked.items()):
            raise ValueError(
                f"run {ctx.run_id!r} already has a proxy with "
                f"{ {k: done.get(k) for k in asked} }, not {asked}; use a new run id for another proxy"
            )
    return ctx.run_stage(PROXY_STAGE, lambda: _sample(ctx, fraction, dev_fraction, seed))


def _sample(ctx: RunContext, fraction: float, dev_fraction: float, seed: int) -> dict[str, Any]:
    store = ctx.store
    pool = read_pool(store)
    recordings, edges = group_recordings(pool)
    train, dev = split_proxy(recordings, fraction=fraction, dev_fraction=dev_fraction, seed=seed)
    shared = {u.utt_id for r in train for u in r.utterances} & {u.utt_id for r in dev for u in r.utterances}
    if shared:
        raise RuntimeError(f"proxy train and dev share utterances {sorted(shared)[:5]}: a bug in split_proxy")

    uris = {}
    for name, part in (("train", train), ("dev", dev)):
        key = ctx.stage_key(PROXY_STAGE, f"{name}.jsonl")
        rebased = [
            replace(u, audio_filepath=relative_audio_path(key, pool.audio_key(u, store))) for u in _utterances(part)
        ]
        write_manifest(store, key, rebased)
        uris[f"{name}_uri"] = store.uri(key)

    report = build_report(recordings, train, dev)
    n_pool = len(pool.utterances)
    n_train, n_dev = sum(len(r.utterances) for r in train), sum(len(r.utterances) for r in dev)
    summary = {
        "pool_version": pool.version,
        "pool_size": n_pool,
        "proxy_size": n_train + n_dev,
        "train_size": n_train,
        "dev_size": n_dev,
        "fraction": fraction,
        "effective_fraction": round((n_train + n_dev) / n_pool, 6),
        "dev_fraction": dev_fraction,
        "seed": seed,
        "strata": len({r.stratum for r in recordings}),
        "duration_bucket_edges_s": [round(e, 4) for e in edges],
        "tvd": {a: report[a]["tvd"]["proxy"] for a in ATTRIBUTES},
        "dev_tvd": {a: report[a]["tvd"]["dev"] for a in ATTRIBUTES},
    }
    report_key = ctx.stage_key(PROXY_STAGE, "report.json")
    store.put_text(report_key, json.dumps({**summary, "attributes": report}, indent=2, sort_keys=True))
    return {**summary, **uris, "report_uri": store.uri(report_key)}
