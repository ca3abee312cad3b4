"""Benchmark: does the search pay for itself? Three ways to spend one CPU budget on one demo week.

    .venv/bin/python tests/benchmarks/bench_search.py [--utterances 500] [--epochs 12] [--trials 6] [--fidelity-k 3]

One demo week (``--utterances`` in the pool, a ``--golden``-utterance v1 golden set with its
unseen cohort) is ingested, featurized (every front end of the space, outside the budgets)
and sampled into a proxy (``proxy:`` of configs/local.yaml). It is a cold start: the
incumbent is the configured default (``model:``/``train:`` of configs/local.yaml, with the
bench's ``--epochs``/``--batch-size``/``--warmup-steps``). Then, in this order:

2. **search**: this search (the incumbent as trial 0, rungs sized from the proxy and the
   full-training budget, the margin) + full training (Ray Train) of what it selected for
   ``--epochs``, starting from the selected trial's top-rung weights (``--init search``, the
   default; ``--init scratch`` as before). Its CPU-seconds are the budget.
1. **no search**: the incumbent trained alone with that whole budget: its epochs are set so
   that its CPU-seconds match (2)'s (estimated from (2)'s training, then measured).
3. **plain Optuna**: TPE (Optuna's defaults) with a median pruner, in this process without
   Ray, one trial at a time, the same proxy, trial length and objective, until it has used
   (2)'s search CPU-seconds; then full training of its best for ``--epochs``.

CPU-seconds are those of this process and all its descendants (Ray's raylet and workers),
sampled with psutil. Each arm's model is exported by the train stage and scored on the
golden set (WER overall and on the unseen cohort). Finally the proxy-fidelity check
(:func:`pipeline.stages.search.check_fidelity`, outside the budgets) trains (2)'s top
``--fidelity-k`` configurations on the full pool (the one (2) trained is not trained again) and
gives the Spearman correlation of the proxy's ranking and their full-training dev WER. Prints one JSON line per arm, then the summary:
``golden_ratio`` = (2)/(1) (goal: (2) at most 0.5 points above (1); aim <= 0.8),
``search_vs_plain_points`` = (2) − (3) (goal <= 0), ``overhead_per_slot`` = search wall ×
slots ÷ summed trial compute (goal <= 1.2). About 20 minutes with the defaults on two cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import score as golden_score  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402

EXPORT_S = 3.0  # after full training's last epoch: best checkpoint, TorchScript export, upload
GOALS = {"max_points_above_no_search": 0.5, "aim_ratio": 0.8, "overhead_per_slot": 1.2}


class CpuMeter:
    """CPU-seconds (user + system) of this process and every descendant, sampled in a thread."""

    def __init__(self, period: float = 0.2):
        import psutil

        self._me = psutil.Process()
        self._seen: dict[tuple[int, float], float] = {}
        self.series: list[tuple[float, float]] = []  # (perf_counter, CPU-seconds so far)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._period = period
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            self.sample()

    def sample(self) -> float:
        import psutil

        procs = [self._me]
        try:
            procs += self._me.children(recursive=True)
        except psutil.Error:
            pass
        for p in procs:
            try:
                t = p.cpu_times()
                key = (p.pid, p.create_time())
            except psutil.Error:
                continue
            with self._lock:
                self._seen[key] = max(self._seen.get(key, 0.0), t.user + t.system)
        with self._lock:
            total = sum(self._seen.values())
            self.series.append((time.perf_counter(), total))
            return total

    def between(self, a: float, b: float) -> float:
        """CPU-seconds spent between perf_counter times ``a`` and ``b`` (nearest samples)."""
        with self._lock:
            series = list(self.series)
        at = lambda t: min(series, key=lambda s: abs(s[0] - t))[1]  # noqa: E731
        return max(0.0, at(b) - at(a))

    def stop(self) -> None:
        self._stop.set()


def bench_config(args: argparse.Namespace, work: Path) -> Config:
    data = load_config().model_dump(mode="json")
    data["storage"]["root"] = str(work / "store")
    data["demo"].update(weeks=1, utterances_per_week=args.utterances, golden_utterances=args.golden)
    data["train"].update(epochs=args.epochs, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                         num_workers=args.workers, init=args.init)
    data["search"].update(trials=args.trials, budget_s=None, max_epochs=None, grace_period=None, reduction_factor=None,
                          metric="score", max_concurrent=2, cpus_per_trial=1, warm_start_top_k=0, seed=0,
                          fidelity_top_k=0, top_rung_fraction=args.top_rung_fraction, min_improvement=args.margin)
    data["mlflow"].update(tracking_uri=f"sqlite:///{work}/mlflow.db", artifact_root=str(work / "mlartifacts"),
                          model_cache=str(work / "model-cache"))
    return Config.model_validate(data)


def prepare(config: Config, run_ids: list[str]) -> str:
    """Corpus, ingest, features for every front end of the space, proxy; returns the golden manifest key."""
    from pipeline.asr.extraction import extract_pool_features
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.run import RunContext
    from pipeline.stages.features import extract_features
    from pipeline.stages.ingest import ingest
    from pipeline.stages.proxy import sample_proxy
    from pipeline.stages.search.space import load_space
    from pipeline.storage import open_store

    store = open_store(config.storage.root)
    golden = f"golden/{config.demo.golden_version}/manifest.jsonl"
    if not store.exists(golden):
        build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
    ingest(RunContext(run_id="bench-pool", config=config, store=store), progress=False)
    space = load_space(config.search.space_path())
    for run_id in run_ids:
        ctx = RunContext(run_id=run_id, config=config, store=store)
        extract_features(ctx, progress=False)
        sample_proxy(ctx)
        for fe in space.frontends(config.features):
            extract_pool_features(ctx, fe, progress=False)
    return golden


def score_model(ctx, golden: str) -> dict[str, Any]:
    from pipeline.asr.evaluation import evaluate_model
    from pipeline.asr.export import load_exported

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        ctx.store.download_file(ctx.stage_key("train", "model.pt"), path)
        result = evaluate_model(load_exported(path), ctx.store, golden, batch_size=16)
    wer = golden_score(result, ctx.store, golden)["wer"]
    return {"golden_wer": wer.get("overall"), "unseen_wer": wer.get("cohort:unseen"), "seen_wer": wer.get("cohort:seen")}


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def arm_search(ctx, meter: CpuMeter) -> dict[str, Any]:
    from pipeline.stages.search import load_best_config, search
    from pipeline.stages.train import train_full

    c0, t0 = meter.sample(), time.perf_counter()
    summary = search(ctx, progress=False)
    c1, t1 = meter.sample(), time.perf_counter()
    train = train_full(ctx, hparams=load_best_config(ctx))
    c2, t2 = meter.sample(), time.perf_counter()
    epochs_cpu = meter.between(t2 - EXPORT_S - train["train_s"], t2 - EXPORT_S)  # the epochs end just before export
    _shutdown_ray()
    return {"arm": "2_search", "cpu_s": round(c2 - c0, 1), "search_cpu_s": round(c1 - c0, 1),
            "train_cpu_s": round(c2 - c1, 1), "wall_s": round(t2 - t0, 1), "search_wall_s": round(t1 - t0, 1),
            "train_wall_s": round(t2 - t1, 1), "epochs": train["epochs"], "train_s": train["train_s"],
            "epochs_cpu_s": round(epochs_cpu, 1), "full_dev_wer": train["dev_wer"], "chosen_trial": summary["best_trial"],
            "init": train.get("init"), "chosen_weights": summary.get("chosen_weights"),
            "selection": summary["selection"],
            "rungs": {k: summary["rungs"][k] for k in ("grace_period", "reduction_factor", "max_t", "rungs", "warmup_scale")},
            "statuses": summary["statuses"], "top_rung": summary["top_rung"], "alerts": summary["alerts"],
            "overhead_per_slot": summary["overhead_per_slot"], "trial_compute_s": summary["trial_compute_s"],
            "n_startup_trials": summary["n_startup_trials"], "best_config": summary["best_config"],
            "leaderboard_head": summary["leaderboard_head"]}


def no_search_epochs(two: dict[str, Any], board: list[dict[str, Any]]) -> int:
    """Epochs of the incumbent's full training that cost about (2)'s CPU-seconds: (2)'s training is split
    into its epochs (the CPU-seconds measured over their wall time) and a fixed part (start-up, export),
    the per-epoch part scaled by the incumbent's proxy-trial speed relative to the selected configuration's."""
    per_epoch = two["epochs_cpu_s"] / two["epochs"]
    fixed = max(0.0, two["train_cpu_s"] - two["epochs_cpu_s"])
    inc = next(r for r in board if r["incumbent"])
    want = two["selection"]["winner"] if two["selection"]["decision"] == "winner" else inc["trial_id"]
    chosen = next((r for r in board if r["trial_id"] == want), inc)
    speed = (inc["trial_seconds"] / max(1, inc["epochs"])) / max(1e-9, chosen["trial_seconds"] / max(1, chosen["epochs"]))
    return max(1, round((two["cpu_s"] - fixed) / (per_epoch * speed)))


def arm_no_search(ctx, meter: CpuMeter, epochs: int) -> dict[str, Any]:
    from pipeline.stages.train import train_full

    c0, t0 = meter.sample(), time.perf_counter()
    train = train_full(ctx, epochs=epochs)
    c1, t1 = meter.sample(), time.perf_counter()
    _shutdown_ray()
    return {"arm": "1_no_search", "cpu_s": round(c1 - c0, 1), "wall_s": round(t1 - t0, 1), "epochs": train["epochs"],
            "init": train.get("init")}


def _proxy_sets(ctx, hp: dict[str, Any]):
    """The proxy's train/dev sets for the front end ``hp`` chose (features already extracted)."""
    from pipeline.asr.extraction import extract_pool_features
    from pipeline.data.dataset import IndexedFeatures
    from pipeline.data.features import FeatureStore

    fe = ctx.config.features.model_copy(update={k: hp[k] for k in ("n_mels", "win_ms", "hop_ms")})
    fs = FeatureStore.open(ctx.store, ctx.run_id, stage=extract_pool_features(ctx, fe, progress=False)["stage"])
    pos = {u["utt_id"]: i for i, u in enumerate(fs.utterances)}
    sets = []
    for name in ("train", "dev"):
        text = ctx.store.get_text(ctx.stage_key("proxy", f"{name}.jsonl"))
        sets.append(IndexedFeatures(fs, [pos[json.loads(line)["utt_id"]] for line in text.splitlines() if line.strip()]))
    return fs, sets[0], sets[1]


def plain_optuna(ctx, budget_cpu_s: float, max_t: int, warmup_scale: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """TPE + median pruner in this process, until ``budget_cpu_s`` of this process's CPU is spent."""
    import optuna
    import torch

    from pipeline.asr.training import TrainingDiverged, resolve_augment, resolve_hparams, train_model
    from pipeline.stages.search.incumbent import config_hparams
    from pipeline.stages.search.space import FRONTEND_PARAMS, load_space, suggest
    from pipeline.stages.search.trial import DIVERGED_WER, score, trial_hparams

    torch.set_num_threads(1)
    config, base, start = ctx.config, config_hparams(ctx.config), time.process_time()
    space = load_space(config.search.space_path())
    spent = lambda: time.process_time() - start  # noqa: E731

    def objective(trial: optuna.Trial) -> float:
        suggest(space, trial)
        hp = trial_hparams(trial.params, base)
        fs, train_set, dev_set = _proxy_sets(ctx, hp)
        model_cfg, train_cfg = resolve_hparams(config, {k: v for k, v in hp.items() if k not in FRONTEND_PARAMS})
        train_cfg = train_cfg.model_copy(update={"warmup_steps": int(round(train_cfg.warmup_steps * warmup_scale))})
        last = [DIVERGED_WER]

        def report(rep, _state):
            last[0] = score(rep.dev_wer, rep.dev_cer, rep.dev_loss)
            trial.report(last[0], rep.epoch)
            if trial.should_prune() or (spent() > budget_cpu_s and rep.epoch < max_t):
                raise optuna.TrialPruned()

        try:
            train_model(model_cfg, train_cfg, train_set, dev_set, n_mels=fs.n_mels, feature_mean=fs.mean,
                        feature_var=fs.var, report=report, max_epochs=max_t, augment=resolve_augment(config, hp))
        except TrainingDiverged:
            return DIVERGED_WER
        return last[0]

    def stop_when_spent(study: optuna.Study, _trial) -> None:
        if spent() > budget_cpu_s:
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, callbacks=[stop_when_spent])
    states = [t.state.name for t in study.trials]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(done, key=lambda t: t.value) if done else None
    info = {"trials": len(states), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "best_value": best.value if best else None, "search_process_cpu_s": round(spent(), 1)}
    return (trial_hparams(best.params, base) if best else base), info


def arm_plain(ctx, meter: CpuMeter, budget_cpu_s: float, max_t: int, warmup_scale: float) -> dict[str, Any]:
    from pipeline.stages.train import train_full

    c0, t0 = meter.sample(), time.perf_counter()
    hp, info = plain_optuna(ctx, budget_cpu_s, max_t, warmup_scale)
    c1 = meter.sample()
    train = train_full(ctx, hparams=hp)
    c2, t2 = meter.sample(), time.perf_counter()
    _shutdown_ray()
    return {"arm": "3_plain_optuna", "cpu_s": round(c2 - c0, 1), "search_cpu_s": round(c1 - c0, 1),
            "train_cpu_s": round(c2 - c1, 1), "wall_s": round(t2 - t0, 1), "epochs": train["epochs"], "optuna": info,
            "best_config": hp}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b not in (None, 0) and math.isfinite(a) else None


def summarize(arms: dict[str, dict[str, Any]], fidelity: dict[str, Any] | None, wall: float) -> dict[str, Any]:
    one, two, three = arms["1_no_search"], arms["2_search"], arms["3_plain_optuna"]
    points = 100 * (two["golden_wer"] - one["golden_wer"])
    return {
        "bench": "search_pays_for_itself",
        "golden_wer": {k: a["golden_wer"] for k, a in arms.items()},
        "unseen_wer": {k: a["unseen_wer"] for k, a in arms.items()},
        "cpu_s": {k: a["cpu_s"] for k, a in arms.items()},
        "golden_ratio_2_over_1": _ratio(two["golden_wer"], one["golden_wer"]),
        "unseen_ratio_2_over_1": _ratio(two["unseen_wer"], one["unseen_wer"]),
        "points_2_minus_1": round(points, 2),
        "never_worse_than_no_search": points <= GOALS["max_points_above_no_search"],
        "aim_ratio_met": (_ratio(two["golden_wer"], one["golden_wer"]) or 9) <= GOALS["aim_ratio"],
        "points_2_minus_3": round(100 * (two["golden_wer"] - three["golden_wer"]), 2),
        "no_worse_than_plain_optuna": two["golden_wer"] <= three["golden_wer"],
        "cpu_ratio_1_over_2": _ratio(one["cpu_s"], two["cpu_s"]),
        "cpu_ratio_3_over_2": _ratio(three["cpu_s"], two["cpu_s"]),
        "overhead_per_slot": two["overhead_per_slot"],
        "overhead_goal_met": two["overhead_per_slot"] is not None and two["overhead_per_slot"] <= GOALS["overhead_per_slot"],
        "selection": two["selection"]["decision"],
        "fidelity_spearman": (fidelity or {}).get("spearman"),
        "goals": GOALS,
        "wall_s": round(wall, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=500, help="utterances in the one demo week")
    parser.add_argument("--golden", type=int, default=120, help="golden-set utterances (v1: with an unseen cohort)")
    parser.add_argument("--epochs", type=int, default=12, help="full training's epochs in arms (2) and (3)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="DDP workers of full training (one thread each)")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--top-rung-fraction", type=float, default=0.5, help="search.top_rung_fraction")
    parser.add_argument("--margin", type=float, default=0.01, help="search.min_improvement")
    parser.add_argument("--init", choices=("search", "scratch"), default="search",
                        help="train.init of full training: search (arm 2 starts from its selected trial's top-rung "
                             "weights; arms 1 and 3 have no search output and start from scratch) or scratch")
    parser.add_argument("--fidelity-k", type=int, default=3, help="0: skip the proxy-fidelity check")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        return run(args, work, started)


def run(args: argparse.Namespace, work: Path, started: float) -> int:
    from pipeline.run import RunContext
    from pipeline.storage import open_store

    config = bench_config(args, work)
    ids = {"2_search": "arm-search", "1_no_search": "arm-nosearch", "3_plain_optuna": "arm-optuna"}
    golden = prepare(config, list(ids.values()))
    print(json.dumps({"prepared_s": round(time.perf_counter() - started, 1), "work": str(work)}), flush=True)
    store = open_store(config.storage.root)
    ctxs = {arm: RunContext(run_id=rid, config=config, store=store) for arm, rid in ids.items()}
    meter = CpuMeter()
    arms: dict[str, dict[str, Any]] = {}
    arms["2_search"] = {**arm_search(ctxs["2_search"], meter), **score_model(ctxs["2_search"], golden)}
    print(json.dumps(arms["2_search"], sort_keys=True), flush=True)
    board = json.loads(store.get_text(ctxs["2_search"].stage_key("search", "leaderboard.json")))
    epochs1 = no_search_epochs(arms["2_search"], board)
    arms["1_no_search"] = {**arm_no_search(ctxs["1_no_search"], meter, epochs1), **score_model(ctxs["1_no_search"], golden)}
    print(json.dumps(arms["1_no_search"], sort_keys=True), flush=True)
    rungs = arms["2_search"]["rungs"]
    arms["3_plain_optuna"] = {**arm_plain(ctxs["3_plain_optuna"], meter, arms["2_search"]["search_cpu_s"], rungs["max_t"],
                                          rungs["warmup_scale"]), **score_model(ctxs["3_plain_optuna"], golden)}
    print(json.dumps(arms["3_plain_optuna"], sort_keys=True), flush=True)
    meter.stop()
    fidelity = None
    if args.fidelity_k >= 2:
        from pipeline.stages.search import check_fidelity

        two = arms["2_search"]  # its full training is one of the top-k's: not trained twice
        fidelity = check_fidelity(ctxs["2_search"], args.fidelity_k, known={two["chosen_trial"]: two["full_dev_wer"]})
        _shutdown_ray()
        print(json.dumps({"fidelity": fidelity}, sort_keys=True), flush=True)
    print(json.dumps(summarize(arms, fidelity, time.perf_counter() - started), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
