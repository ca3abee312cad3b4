"""Benchmark: golden-set WER of the configured default model for front-end and augmentation choices.

    .venv/bin/python tests/benchmarks/bench_quality.py [--epochs 30] [--variants a,b,d] [--jobs 2]

(``make quality``; also part of ``make bench``.) Builds the demo corpus (``demo.weeks``
weeks and the configured golden version) once under ``.asr-retune/bench/quality/``,
ingests the drops into one pool, and trains the configured default model (``model:`` /
``train:`` of configs/local.yaml) with the same fixed budget for each variant of the
ablation, in-process with the one training loop (no Ray; ``--jobs`` variants at a time, one
thread each). Every trained model is exported and scored on the golden set, and the bench
prints one JSON object per variant and a summary: WER overall, per cohort (seen/unseen),
per recording condition and per speaker.

Variants: ``a`` today's front end (no level normalization, no dither, pool statistics
only), no augmentation; ``b`` the robust front end (RMS level, dither, the pool's
statistics: the best of the three mean-normalization choices), no augmentation;
``b_utterance`` / ``b_sliding`` the robust front end with per-utterance or sliding-window
mean normalization instead; ``c_<aug>`` ``b`` plus one augmentation (``specaug``, ``gain``,
``speed``, ``noise``, ``vtlp``); ``d`` ``b`` plus all of them; ``e`` ``b`` plus the three that
helped alone at 30 epochs (speed perturbation, VTLP and SpecAugment; no gain, no noise).

A finished variant's result is kept under ``results/`` of the work folder, keyed by a
hash of everything it depends on (its whole configuration, the epochs, the golden set),
so a rerun trains only what changed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import PROJECT_ROOT, AugmentConfig, Config, load_config  # noqa: E402

WORK = PROJECT_ROOT / ".asr-retune" / "bench" / "quality"
NO_AUGMENT = {"copies": 0, "vtlp": 0.0}
NO_SPECAUG = {"time_masks": 0, "freq_masks": 0}
PLAIN_FRONTEND = {"level": "none", "dither_db": None, "normalize": "global"}
ONE_AUG = {  # each waveform augmentation alone: two copies that only get that one
    "gain": {"copies": 2, "speed": [1.0], "noise_snr_db": None},
    "speed": {"copies": 2, "gain_db": None, "noise_snr_db": None},
    "noise": {"copies": 2, "speed": [1.0], "gain_db": None, "noise_prob": 1.0},
}


def variants(config: Config) -> dict[str, dict[str, Any]]:
    """name -> {features, augment, model} overrides of the configuration."""
    specaug = {k: getattr(config.model, k) for k in ("time_masks", "time_mask_width", "freq_masks", "freq_mask_width")}
    if not specaug["time_masks"] and not specaug["freq_masks"]:
        specaug = {"time_masks": 2, "time_mask_width": 10, "freq_masks": 2, "freq_mask_width": 8}
    robust = {"level": "rms", "dither_db": -60.0, "normalize": "global"}
    out: dict[str, dict[str, Any]] = {
        "a": {"features": PLAIN_FRONTEND, "augment": NO_AUGMENT, "model": NO_SPECAUG},
        "b": {"features": robust, "augment": NO_AUGMENT, "model": NO_SPECAUG},
        "b_utterance": {"features": {**robust, "normalize": "utterance"}, "augment": NO_AUGMENT, "model": NO_SPECAUG},
        "b_sliding": {"features": {**robust, "normalize": "sliding"}, "augment": NO_AUGMENT, "model": NO_SPECAUG},
        "c_specaug": {"features": robust, "augment": NO_AUGMENT, "model": specaug},
        "c_vtlp": {"features": robust, "augment": {"copies": 0, "vtlp": 0.1}, "model": NO_SPECAUG},
    }
    for name, aug in ONE_AUG.items():
        out[f"c_{name}"] = {"features": robust, "augment": aug, "model": NO_SPECAUG}
    out["d"] = {"features": robust, "augment": {"copies": 3, "vtlp": 0.1}, "model": specaug}
    out["e"] = {"features": robust, "augment": {**ONE_AUG["speed"], "vtlp": 0.1}, "model": specaug}
    return out


def _variant_config(config: Config, spec: dict[str, Any], epochs: int) -> Config:
    data = config.model_dump(mode="json")
    data["features"].update(spec["features"])
    data["augment"] = {**AugmentConfig().model_dump(mode="json"), **spec["augment"]}
    data["model"].update(spec["model"])
    data["train"].update({"epochs": epochs, "num_workers": 1})
    data["storage"]["root"] = str(WORK / "store")
    return Config.model_validate(data)


def result_key(config: Config, epochs: int, golden: str) -> str:
    """What a variant's result depends on: its configuration (the store root aside), epochs, golden set."""
    import hashlib

    data = config.model_dump(mode="json")
    data["storage"].pop("root")
    text = json.dumps({"config": data, "epochs": epochs, "golden": golden}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_corpus(config: Config) -> str:
    """The demo drops and golden set, built once; returns the golden manifest key."""
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.storage import open_store

    store = open_store(str(WORK / "store"))
    golden = f"golden/{config.demo.golden_version}/manifest.jsonl"
    marker = WORK / "corpus.json"
    recipe = {"demo": config.demo.model_dump(mode="json"), "sample_rate": config.audio.sample_rate}
    if not (marker.exists() and json.loads(marker.read_text()) == recipe and store.exists(golden)):
        t0 = time.perf_counter()
        build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(recipe))
        print(json.dumps({"corpus_built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return golden


def prepare_features(config: Config, name: str) -> str:
    """Ingest (once) and extract this variant's features (cached per front end and copies); returns the run id."""
    from pipeline.run import RunContext
    from pipeline.stages.features import extract_features
    from pipeline.stages.ingest import ingest

    ingest(RunContext.create(config, run_id="quality-pool"), progress=False)  # once: later calls find no new drop
    run_id = f"quality-{name}"
    extract_features(RunContext.create(config, run_id=run_id), progress=False)
    return run_id


def train_and_score(name: str, config_json: dict[str, Any], run_id: str, golden: str, work: str) -> dict[str, Any]:
    """One variant, in its own process: train with the one loop, export, score on the golden set."""
    import torch

    torch.set_num_threads(1)
    from pipeline.asr.evaluation import evaluate_model
    from pipeline.asr.export import export_model, load_exported
    from pipeline.asr.training import train_model
    from pipeline.data.dataset import IndexedFeatures, split_by_utterance
    from pipeline.data.features import FeatureStore
    from pipeline.storage import open_store

    config = Config.model_validate(config_json)
    store = open_store(config.storage.root)
    fs = FeatureStore.open(store, run_id)
    train_idx, dev_idx = split_by_utterance(fs.utterances, config.train.dev_fraction, config.train.seed)
    t0 = time.perf_counter()
    model, history = train_model(
        config.model, config.train, IndexedFeatures(fs, train_idx), IndexedFeatures(fs, dev_idx),
        n_mels=fs.n_mels, feature_mean=fs.mean, feature_var=fs.var, augment=config.augment,
    )
    train_s = time.perf_counter() - t0
    path = Path(work) / "models" / f"{name}.pt"
    export_model(model, fs.index["frontend"], path, {"bench": "quality", "variant": name})
    result = evaluate_model(load_exported(path), store, golden, batch_size=16)
    return {"variant": name, "train_s": round(train_s, 1), "epochs": len(history),
            "final_dev_wer": round(history[-1].dev_wer, 4), **score(result, store, golden)}


def score(result, store, golden: str) -> dict[str, Any]:
    """WER overall, per cohort, per condition and per speaker (golden manifest fields ``seen``, ``condition``)."""
    records = {r["utt_id"]: r for r in map(json.loads, store.get_text(golden).splitlines()) if r}
    groups: dict[str, list[int]] = {}
    for u in result.utts:
        rec = records.get(u.utt_id, {})
        keys = [f"speaker:{u.speaker}", "overall"]
        if isinstance(rec.get("seen"), bool):
            keys.append("cohort:seen" if rec["seen"] else "cohort:unseen")
        if rec.get("condition"):
            keys.append(f"condition:{rec['condition']}")
        for k in keys:
            acc = groups.setdefault(k, [0, 0, 0])
            acc[0] += u.errors
            acc[1] += u.ref_words
            acc[2] += 1
    wer = {k: round(e / w, 4) for k, (e, w, _) in sorted(groups.items()) if w}
    counts = {k: n for k, (_, _, n) in sorted(groups.items())}
    return {"wer": wer, "n_utts": counts}


def training_utterances(config: Config, run_id: str) -> dict[str, int]:
    """Utterances per speaker in the training split every variant trains on (the pool less its dev split)."""
    from collections import Counter

    from pipeline.data.dataset import split_by_utterance
    from pipeline.data.features import FeatureStore
    from pipeline.storage import open_store

    fs = FeatureStore.open(open_store(config.storage.root), run_id)
    train_idx, _ = split_by_utterance(fs.utterances, config.train.dev_fraction, config.train.seed)
    return dict(sorted(Counter(str(fs.utterances[i].get("speaker", "")) for i in train_idx).items()))


def main() -> int:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30,
                        help="training epochs of every variant (fixed budget; at 15 the augmentations had not "
                             "caught up with no augmentation yet, see README 'Quality')")
    parser.add_argument("--variants", help="comma-separated subset (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once (one core each)")
    parser.add_argument("--work", type=Path, default=WORK, help=f"work folder (default: {WORK})")
    args = parser.parse_args()
    WORK = args.work.resolve()
    base = load_config()
    # the benchmark's corpus: the two clean weeks (week 3 is the demo recipe's bad drop)
    base = base.model_copy(update={"demo": base.demo.model_copy(update={"weeks": 2})})
    table = variants(base)
    chosen = args.variants.split(",") if args.variants else list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(table)}")
    started = time.perf_counter()
    golden = prepare_corpus(base)
    jobs = {}
    for name in chosen:
        config = _variant_config(base, table[name], args.epochs)
        jobs[name] = (config, prepare_features(config, name))
    print(json.dumps({"prepared_s": round(time.perf_counter() - started, 1), "golden": golden}), flush=True)
    results = []
    todo = {}
    for name, (config, run_id) in jobs.items():
        cached = WORK / "results" / f"{name}-{result_key(config, args.epochs, golden)}.json"
        if cached.exists():
            results.append(json.loads(cached.read_text()))
            print(json.dumps({**results[-1], "cached": True}, sort_keys=True), flush=True)
        else:
            todo[name] = (config, run_id, cached)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(train_and_score, n, c.model_dump(mode="json"), r, golden, str(WORK)): (n, path)
                   for n, (c, r, path) in todo.items()}
        for future in cf.as_completed(futures):
            row = future.result()
            results.append(row)
            path = futures[future][1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, sort_keys=True))
            print(json.dumps(row, sort_keys=True), flush=True)
    results.sort(key=lambda r: chosen.index(r["variant"]))
    best = min(results, key=lambda r: r["wer"]["overall"])
    summary = {"bench": "quality", "epochs": args.epochs, "golden": golden, "wall_s": round(time.perf_counter() - started, 1),
               "best": best["variant"], "table": {r["variant"]: r["wer"] for r in results},
               "training_utterances": training_utterances(*jobs[chosen[0]])}
    (WORK / "quality.json").write_text(json.dumps({"summary": summary, "results": results}, indent=2))
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
