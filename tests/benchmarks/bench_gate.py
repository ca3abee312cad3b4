"""Benchmark: the gate's error rates, measured by simulation on real per-utterance results.

    .venv/bin/python tests/benchmarks/bench_gate.py [--replicates 200] [--epochs 15] [--retrain] [--strict]

(part of ``make bench``.)

1. Two real models (cached). The demo corpus (``demo.weeks`` drops and the golden set
   ``demo.golden_version`` of configs/local.yaml) is built under ``.asr-retune/bench/gate/``,
   ingested and featurized; the configured default model (``model:``, ``train:``,
   ``augment:``) is trained with two seeds (``train.seed`` 0 and 1) for ``--epochs`` epochs,
   in-process with the one training loop (no Ray; both seeds at once, one core each), and
   both are exported and scored on the golden set. The per-utterance results are cached in
   ``.asr-retune/bench/gate/results-<key>.json``, keyed by the corpus, front-end, model,
   training and augmentation settings, the epochs, the seeds and the source of
   ``pipeline/{demo,data,asr}``: a rerun with nothing changed only simulates (seconds).
2. Simulation. Each replicate is a synthetic (production, candidate) pair on the golden
   set: for every utterance a coin flip gives one seed's result to production and the
   other's to the candidate (the noise of retraining: the two are equally good, and differ
   where two retrains differ). From that pair, the cases:
   ``copy`` (a) the candidate as drawn; ``better_2pts`` (b) each candidate error removed
   with probability 2 pts x words / errors (2 points better overall); ``worse_10pts_one_speaker``
   (c) each reference word of one speaker (every speaker in turn) gains an error with
   probability 0.10; ``worse_1pt`` (d) each reference word gains an error with probability 0.01.
   ``--swap speaker`` flips per speaker instead of per utterance (a stricter noise model:
   a retrain better for one whole speaker).
3. The gate (``gate:`` of configs/local.yaml, all rules; the real-time factor is not
   simulated) decides every replicate in both modes. Prints one JSON object with the pass
   rates and the targets — (a) >= 95 % in non-regression and <= 5 % in improve mode,
   (b) >= 90 %, (c) and (d) <= 5 % (both modes) — and writes them for the golden version to
   ``gate.calibration_file`` (configs/gate-calibration.json), which the gate's report quotes.
   ``--strict`` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per process: the bench runs its processes side by side

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import PROJECT_ROOT, Config, GateConfig, load_config  # noqa: E402

WORK = PROJECT_ROOT / ".asr-retune" / "bench" / "gate"
SEEDS = (0, 1)
MODES = ("non-regression", "improve")
CASES = ("copy", "better_2pts", "worse_10pts_one_speaker", "worse_1pt")
TARGETS = {  # case -> mode -> (comparison, rate)
    "copy": {"non-regression": (">=", 0.95), "improve": ("<=", 0.05)},
    "better_2pts": {"non-regression": (">=", 0.90), "improve": (">=", 0.90)},
    "worse_10pts_one_speaker": {"non-regression": ("<=", 0.05), "improve": ("<=", 0.05)},
    "worse_1pt": {"non-regression": ("<=", 0.05), "improve": ("<=", 0.05)},
}
SOURCES = ("pipeline/demo", "pipeline/data", "pipeline/asr")  # the code the two models' results depend on
NOT_SOURCES = ("pipeline/asr/metrics.py",)  # the gate's statistics live there too: editing them needs no retraining


# --------------------------------------------------------------------------- two trained models (cached)


def bench_config(base: Config, epochs: int) -> Config:
    data = base.model_dump(mode="json")
    data["train"].update({"epochs": epochs, "num_workers": 1})
    data["storage"]["root"] = str(WORK / "store")
    return Config.model_validate(data)


def cache_key(config: Config, epochs: int) -> str:
    """What the two models' results depend on: settings, budget, seeds and the code that makes them."""
    recipe = {k: config.model_dump(mode="json")[k] for k in ("demo", "audio", "features", "augment", "model")}
    recipe["train"] = {k: v for k, v in config.train.model_dump(mode="json").items() if k != "seed"}
    recipe |= {"epochs": epochs, "seeds": list(SEEDS)}
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for folder in SOURCES:
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            if path.relative_to(PROJECT_ROOT).as_posix() in NOT_SOURCES:
                continue
            h.update(path.relative_to(PROJECT_ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def prepare(config: Config) -> tuple[str, str]:
    """Corpus, pool and features under WORK; returns (run id, golden manifest key)."""
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.run import RunContext
    from pipeline.stages.features import extract_features
    from pipeline.stages.ingest import ingest
    from pipeline.storage import open_store

    store = open_store(config.storage.root)
    golden = f"golden/{config.demo.golden_version}/manifest.jsonl"
    marker = WORK / "corpus.json"
    recipe = {"demo": config.demo.model_dump(mode="json"), "sample_rate": config.audio.sample_rate}
    if not (marker.exists() and json.loads(marker.read_text()) == recipe and store.exists(golden)):
        build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(recipe))
    ingest(RunContext.create(config, run_id="gate-bench-pool"), progress=False)
    run_id = "gate-bench"
    extract_features(RunContext.create(config, run_id=run_id), progress=False)
    return run_id, golden


def train_and_score(seed: int, config_json: dict[str, Any], run_id: str, golden: str, work: str) -> dict[str, Any]:
    """One seed, in its own process: train with the one loop, export the best epoch, score the golden set."""
    import torch

    torch.set_num_threads(1)
    from pipeline.asr.evaluation import evaluate_model
    from pipeline.asr.export import export_model, load_exported
    from pipeline.asr.training import load_checkpoint_model, train_model
    from pipeline.data.dataset import IndexedFeatures, split_by_utterance
    from pipeline.data.features import FeatureStore
    from pipeline.storage import open_store

    config = Config.model_validate(config_json)
    train_cfg = config.train.model_copy(update={"seed": seed})
    store = open_store(config.storage.root)
    fs = FeatureStore.open(store, run_id)
    train_idx, dev_idx = split_by_utterance(fs.utterances, train_cfg.dev_fraction, train_cfg.seed)
    best: dict[str, Any] = {"dev_wer": float("inf"), "state": None}

    def keep_best(rep, state) -> None:  # the train stage exports the best epoch by dev WER; so does this
        if state is not None and rep.dev_wer <= best["dev_wer"]:
            best.update(dev_wer=rep.dev_wer, state=state, epoch=rep.epoch)

    t0 = time.perf_counter()
    _, history = train_model(
        config.model, train_cfg, IndexedFeatures(fs, train_idx), IndexedFeatures(fs, dev_idx),
        n_mels=fs.n_mels, feature_mean=fs.mean, feature_var=fs.var, augment=config.augment, report=keep_best,
    )
    train_s = time.perf_counter() - t0
    path = Path(work) / "models" / f"seed{seed}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model(load_checkpoint_model(best["state"]), fs.index["frontend"], path, {"bench": "gate", "seed": seed})
    result = evaluate_model(load_exported(path), store, golden, batch_size=16)
    return {"seed": seed, "train_s": round(train_s, 1), "epochs": len(history), "best_epoch": best["epoch"],
            "dev_wer": round(best["dev_wer"], 4), "golden_wer": round(result.summary()["wer"], 4),
            "utts": [asdict(u) for u in result.utts]}


def load_or_train(base: Config, epochs: int, retrain: bool) -> dict[str, Any]:
    """The two seeds' per-utterance golden-set results, the golden manifest's groups and its sha256."""
    from pipeline.stages.gate.calibration import manifest_sha256
    from pipeline.stages.gate.stage import read_cohorts, read_conditions
    from pipeline.storage import open_store

    config = bench_config(base, epochs)
    key = cache_key(config, epochs)
    cache = WORK / f"results-{key}.json"
    if cache.exists() and not retrain:
        return {**json.loads(cache.read_text()), "cached": True}
    t0 = time.perf_counter()
    run_id, golden = prepare(config)
    prepared_s = time.perf_counter() - t0
    with cf.ProcessPoolExecutor(len(SEEDS), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(train_and_score, s, config.model_dump(mode="json"), run_id, golden, str(WORK)) for s in SEEDS]
        models = sorted((f.result() for f in futures), key=lambda m: m["seed"])
    text = open_store(config.storage.root).get_text(golden)
    out = {
        "key": key, "golden_version": config.demo.golden_version, "manifest_sha256": manifest_sha256(text),
        "cohorts": read_cohorts(text), "conditions": read_conditions(text), "epochs": epochs,
        "prepared_s": round(prepared_s, 1), "trained_s": round(time.perf_counter() - t0 - prepared_s, 1),
        "models": models,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return {**out, "cached": False}


# --------------------------------------------------------------------------- synthetic candidates


class Golden:
    """The two seeds' results as arrays over the golden set (same utterance order)."""

    def __init__(self, results: dict[str, Any]):
        from pipeline.asr.metrics import UttScore

        a, b = ([UttScore(**u) for u in m["utts"]] for m in results["models"])
        by_id = {u.utt_id: u for u in b}
        self.template = a
        self.a = np.array([u.errors for u in a])
        self.b = np.array([by_id[u.utt_id].errors for u in a])
        self.words = np.array([u.ref_words for u in a])
        self.speakers = sorted({u.speaker for u in a})
        self.speaker_of = np.array([self.speakers.index(u.speaker) for u in a])

    def scores(self, errors: np.ndarray) -> list:
        return [replace(u, errors=int(e), char_errors=int(e)) for u, e in zip(self.template, errors)]

    def null_pair(self, rng: np.random.Generator, swap: str) -> tuple[np.ndarray, np.ndarray]:
        """(production, candidate) errors: one seed's result each, by coin flip per utterance (or speaker)."""
        if swap == "speaker":
            flip = rng.random(len(self.speakers))[self.speaker_of] < 0.5
        else:
            flip = rng.random(len(self.a)) < 0.5
        return np.where(flip, self.b, self.a), np.where(flip, self.a, self.b)

    def case(self, name: str, rng: np.random.Generator, replicate: int, swap: str) -> tuple[np.ndarray, np.ndarray, str | None]:
        prod, cand = self.null_pair(rng, swap)
        speaker = None
        if name == "better_2pts":
            q = min(1.0, 0.02 * self.words.sum() / max(1, cand.sum()))
            cand = cand - rng.binomial(cand, q)
        elif name == "worse_10pts_one_speaker":
            k = replicate % len(self.speakers)
            speaker = self.speakers[k]
            cand = cand + np.where(self.speaker_of == k, rng.binomial(self.words, 0.10), 0)
        elif name == "worse_1pt":
            cand = cand + rng.binomial(self.words, 0.01)
        return prod, cand, speaker


def verdicts(golden: Golden, prod: np.ndarray, cand: np.ndarray, cfg: GateConfig, cohorts: dict[str, str],
             conditions: dict[str, str]) -> dict[str, tuple[bool, list[str]]]:
    """mode -> (passed, failing rules): one decision (groups and bootstraps do not depend on the mode)."""
    from pipeline.stages.gate.rules import decide, rule_delta_wer

    out = decide(golden.scores(cand), golden.scores(prod), candidate_rtf=0.0, cfg=cfg.model_copy(update={"mode": "improve"}),
                 cohorts=cohorts, conditions=conditions)
    others = [r.name for r in out.rules if not r.passed and r.name != "delta_wer"]
    res = {}
    for mode in MODES:
        rule = rule_delta_wer(out.bootstrap, cfg.model_copy(update={"mode": mode}), out.utterance_bootstrap)
        failing = others + ([] if rule.passed else ["delta_wer"])
        res[mode] = (not failing, failing)
    return res


def simulate_case(results: dict[str, Any], cfg_json: dict[str, Any], ci: int, replicates: int, swap: str,
                  seed: int) -> dict[str, Any]:
    """One case's replicates (in a worker process): passes and failing rules per mode, passes per speaker."""
    golden, cfg, name = Golden(results), GateConfig.model_validate(cfg_json), CASES[ci]
    rng = np.random.default_rng([seed, ci])
    passed, failing = Counter(), {m: Counter() for m in MODES}
    per_speaker: dict[str, Counter] = {}
    for r in range(replicates):
        prod, cand, speaker = golden.case(name, rng, r, swap)
        for mode, (ok, why) in verdicts(golden, prod, cand, cfg, results["cohorts"], results["conditions"]).items():
            passed[mode] += ok
            failing[mode].update(why)
            if speaker is not None:
                per_speaker.setdefault(speaker, Counter())[mode] += ok
        if speaker is not None:
            per_speaker[speaker]["n"] += 1
    return {"passed": dict(passed), "failing": {m: dict(c) for m, c in failing.items()},
            "per_speaker": {s: dict(c) for s, c in per_speaker.items()}}


def simulate(results: dict[str, Any], cfg: GateConfig, replicates: int, swap: str, jobs: int,
             seed: int = 20261) -> dict[str, Any]:
    """Pass rates per case and mode, failing-rule counts, and case (c) per speaker (cases run ``jobs`` at a time)."""
    args = [(results, cfg.model_dump(mode="json"), ci, replicates, swap, seed) for ci in range(len(CASES))]
    if jobs > 1:
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(simulate_case, *zip(*args)))
    else:
        parts = [simulate_case(*a) for a in args]
    rates = {c: {m: round(p["passed"].get(m, 0) / replicates, 4) for m in MODES} for c, p in zip(CASES, parts)}
    by_speaker = {s: {m: round(c.get(m, 0) / c["n"], 3) for m in MODES}
                  for p in parts for s, c in sorted(p["per_speaker"].items())}
    return {"pass_rates": rates, "failing_rules": {c: p["failing"] for c, p in zip(CASES, parts)},
            "worse_10pts_one_speaker_by_speaker": by_speaker}


def targets_met(rates: dict[str, dict[str, float]]) -> dict[str, dict[str, bool]]:
    return {c: {m: (rates[c][m] >= t if op == ">=" else rates[c][m] <= t) for m, (op, t) in TARGETS[c].items()}
            for c in CASES}


def real_comparison(golden: Golden, results: dict[str, Any], cfg: GateConfig) -> dict[str, Any]:
    """The gate on the real pair (seed 1 as the candidate, seed 0 as production): retrain noise as measured."""
    from pipeline.stages.gate.rules import decide

    out = decide(golden.scores(golden.b), golden.scores(golden.a), candidate_rtf=0.0, cfg=cfg,
                 cohorts=results["cohorts"], conditions=results["conditions"])
    d = out.decision
    return {"delta": d["bootstrap"]["delta"], "blockwise_ci": [d["bootstrap"]["ci_low"], d["bootstrap"]["ci_high"]],
            "utterance_ci": [d["bootstrap_utterance"]["ci_low"], d["bootstrap_utterance"]["ci_high"]],
            "se_blockwise": d["bootstrap"]["se"], "se_utterance": d["bootstrap_utterance"]["se"],
            "detectability": {k: d["detectability"][k] for k in ("regression_mde", "improvement_mde", "interval_mde")},
            "groups": {g["key"]: {"n_utts": g["n_utts"], "mde": g["mde"], "verdict": g["verdict"]} for g in d["groups"]},
            "verdicts": {m: verdicts(golden, golden.a, golden.b, cfg, results["cohorts"], results["conditions"])[m][0]
                         for m in MODES}}


# --------------------------------------------------------------------------- main


def calibration_entry(results: dict[str, Any], golden: Golden, cfg: GateConfig, sim: dict[str, Any], met: dict,
                      args: argparse.Namespace, pair: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.gate.calibration import rule_settings

    return {
        "golden_version": results["golden_version"], "manifest_sha256": results["manifest_sha256"],
        "n_utts": len(golden.a), "n_words": int(golden.words.sum()), "n_speakers": len(golden.speakers),
        "measured_at": dt.date.today().isoformat(), "replicates": args.replicates, "swap": args.swap,
        "command": f"tests/benchmarks/bench_gate.py --replicates {args.replicates} --epochs {args.epochs}",
        "models": {f"seed{m['seed']}": {"golden_wer": m["golden_wer"], "dev_wer": m["dev_wer"], "epochs": m["epochs"]}
                   for m in results["models"]},
        "gate": rule_settings(cfg), "pass_rates": sim["pass_rates"], "targets_met": met,
        "retrain_pair": {k: pair[k] for k in ("delta", "se_blockwise", "se_utterance")} | pair["detectability"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicates", type=int, default=200, help="synthetic candidates per case")
    parser.add_argument("--jobs", type=int, default=2, help="cases simulated at once (one core each)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each seed (fixed budget)")
    parser.add_argument("--swap", choices=("utterance", "speaker"), default="utterance", help="the retrain-noise model")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached per-utterance results")
    parser.add_argument("--results", type=Path, help="simulate on this results-<key>.json (no training, no key check)")
    parser.add_argument("--no-write", action="store_true", help="do not update the calibration file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    started = time.perf_counter()
    base = load_config()
    # the benchmark's corpus: the two clean weeks (week 3 is the demo recipe's bad drop)
    base = base.model_copy(update={"demo": base.demo.model_copy(update={"weeks": 2})})
    cfg = base.gate
    if args.results:
        results = {**json.loads(args.results.read_text()), "cached": True}
    else:
        results = load_or_train(base, args.epochs, args.retrain)
    golden = Golden(results)
    t0 = time.perf_counter()
    sim = simulate(results, cfg, args.replicates, args.swap, args.jobs)
    met = targets_met(sim["pass_rates"])
    pair = real_comparison(golden, results, cfg)
    missed = [f"{c}/{m}" for c in CASES for m, ok in met[c].items() if not ok]
    out = {
        "benchmark": "gate_calibration", "golden_version": results["golden_version"], "cached_models": results["cached"],
        "n_utts": len(golden.a), "n_speakers": len(golden.speakers), "replicates": args.replicates, "swap": args.swap,
        "models": [{k: m[k] for k in ("seed", "golden_wer", "dev_wer", "best_epoch", "epochs", "train_s")}
                   for m in results["models"]],
        "retrain_pair": pair, **sim,
        "targets": {c: {m: f"{op} {t:.0%}" for m, (op, t) in TARGETS[c].items()} for c in CASES},
        "targets_met": met, "missed": missed, "simulate_s": round(time.perf_counter() - t0, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if not args.no_write:
        from pipeline.stages.gate.calibration import calibration_path, write_calibration

        write_calibration(calibration_path(cfg), results["golden_version"],
                          calibration_entry(results, golden, cfg, sim, met, args, pair))
        out["calibration_file"] = str(calibration_path(cfg))
    print(json.dumps(out, sort_keys=True), flush=True)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
