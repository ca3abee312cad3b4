"""Benchmark: ASHA + TPE against random search without early stopping, same trial count.

    .venv/bin/python tests/benchmarks/bench_search.py [--trials 8] [--max-epochs 4] [--utterances 300]

Both searches run on the same proxy (a demo corpus of --utterances, ingested, features,
proxy = the whole pool), same space (configs/search_space.yaml), same metric (dev loss),
no warm start. For each, trials are taken in the order they were created: cumulative
trial-epochs against the best metric so far. Prints one JSON object:
- compute_ratio: trial-epochs ASHA+TPE needed to reach random search's final best,
  divided by random search's total trial-epochs (goal <= 1/3; null if never reached);
- overhead: search wall time / sum of trial compute time for the ASHA run (trials run
  max_concurrent at a time, so the per-slot figure multiplies by that; goal <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import Config, DemoConfig, ProxyConfig, SearchConfig
from pipeline.demo.corpus import build_demo_corpus
from pipeline.run import RunContext
from pipeline.stages.features import extract_features
from pipeline.stages.ingest.stage import ingest
from pipeline.stages.proxy import sample_proxy
from pipeline.storage import open_store


def _run(root: Path, name: str, search: SearchConfig, utterances: int) -> tuple[dict, list[dict]]:
    from pipeline.stages.search.stage import search as run_search

    config = Config(
        demo=DemoConfig(weeks=1, utterances_per_week=utterances, golden_utterances=10),
        proxy=ProxyConfig(fraction=1.0, dev_fraction=0.2),
        search=search,
    )
    config.mlflow.tracking_uri = f"sqlite:///{root}/mlflow.db"
    config.mlflow.artifact_root = str(root / "mlartifacts")
    store = open_store(str(root / "store"))
    if not store.exists("golden/v1/manifest.jsonl"):
        build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
    ctx = RunContext(run_id=name, config=config, store=store)
    ingest(ctx, progress=False)
    extract_features(ctx, progress=False)
    sample_proxy(ctx)
    # no warm start: both searches start from nothing
    summary = run_search(ctx, production_hparams=None, progress=False)
    board = json.loads(store.get_text(ctx.stage_key("search", "leaderboard.json")))
    return summary, board


def _timeline(board: list[dict]) -> list[tuple[int, float]]:
    out, spent, best = [], 0, float("inf")
    for r in sorted(board, key=lambda r: r["trial_number"] or 0):
        spent += r["epochs"]
        if r["best_metric"] is not None:
            best = min(best, r["best_metric"])
        out.append((spent, best))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--utterances", type=int, default=300)
    args = parser.parse_args()
    common = dict(trials=args.trials, max_epochs=args.max_epochs, grace_period=1, reduction_factor=2,
                  max_concurrent=2, metric="dev_loss", warm_start_top_k=0, budget_s=3600, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        asha_sum, asha = _run(root, "asha", SearchConfig(**common, scheduler="asha", sampler="tpe"), args.utterances)
        rand_sum, rand = _run(root, "random", SearchConfig(**common, scheduler="fifo", sampler="random"), args.utterances)
        import ray

        ray.shutdown()
    ta, tr = _timeline(asha), _timeline(rand)
    target = tr[-1][1]
    reached = next((spent for spent, best in ta if best <= target), None)
    print(json.dumps({
        "benchmark": "search_asha_vs_random",
        "trials": args.trials,
        "max_epochs": args.max_epochs,
        "metric": "dev_loss",
        "asha_tpe": {"trial_epochs": ta[-1][0], "final_best": ta[-1][1], "timeline": ta,
                     "statuses": asha_sum["statuses"], "wall_s": asha_sum["wall_s"], "trial_compute_s": asha_sum["trial_compute_s"]},
        "random_fifo": {"trial_epochs": tr[-1][0], "final_best": tr[-1][1], "timeline": tr,
                        "wall_s": rand_sum["wall_s"], "trial_compute_s": rand_sum["trial_compute_s"]},
        "asha_epochs_to_reach_random_best": reached,
        "compute_ratio": round(reached / tr[-1][0], 3) if reached is not None else None,
        "compute_goal": round(1 / 3, 3),
        "overhead": round(asha_sum["wall_s"] / asha_sum["trial_compute_s"], 3) if asha_sum["trial_compute_s"] else None,
        "overhead_per_slot": round(2 * asha_sum["wall_s"] / asha_sum["trial_compute_s"], 3) if asha_sum["trial_compute_s"] else None,
        "overhead_goal": 1.2,
    }), flush=True)


if __name__ == "__main__":
    main()
