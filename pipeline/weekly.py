"""The weekly run, chained in-process: the stages that exist, in order.

The Airflow DAG calls the same stage functions one task each; this module is for the
CLI (``asr-retune demo``) and for tests that run the chain without Airflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipeline.config import Config
from pipeline.run import RunContext, new_run_id
from pipeline.storage import join, open_store


def _stages() -> list[tuple[str, Callable[..., dict[str, Any]]]]:
    from pipeline.features import extract_features
    from pipeline.ingest import ingest
    from pipeline.proxy import sample_proxy
    from pipeline.canary import deploy_registered
    from pipeline.gate import gate
    from pipeline.registry import register
    from pipeline.search import load_best_config, search
    from pipeline.trainer import train_full

    return [
        ("ingest", lambda ctx, progress: ingest(ctx, progress=progress)),
        ("features", lambda ctx, progress: extract_features(ctx, progress=progress)),
        ("proxy", lambda ctx, progress: sample_proxy(ctx)),
        ("search", lambda ctx, progress: search(ctx, progress=progress)),
        ("train", lambda ctx, progress: train_full(ctx, hparams=load_best_config(ctx))),
        ("gate", lambda ctx, progress: gate(ctx)),
        ("register", lambda ctx, progress: register(ctx) if ctx.summary("gate")["passed"] else {"registered": False, "reason": "gate failed"}),
        ("deploy", lambda ctx, progress: deploy_registered(ctx) if ctx.is_complete("register") else {"deployed": False, "reason": "nothing registered"}),
    ]


def evaluate_golden(ctx: RunContext) -> dict[str, Any]:
    """Golden-set WER of the run's trained model (the gate compares it with production)."""
    from pipeline.evaluation import evaluate_model
    from pipeline.export import load_exported
    import tempfile

    golden = join("golden", ctx.config.demo.golden_version, "manifest.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.pt"
        ctx.store.download_file(ctx.stage_key("train", "model.pt"), path)
        result = evaluate_model(load_exported(path), ctx.store, golden)
    summary = result.summary()
    return {
        "golden": ctx.store.uri(golden),
        "wer": round(summary["wer"], 4),
        "cer": round(summary["cer"], 4),
        "n_utts": summary["n_utts"],
        "rtf": round(summary["rtf"], 4),
        "per_speaker_wer": {k.split(":", 1)[1]: round(v["wer"], 4) for k, v in summary["per_group"].items() if k.startswith("speaker:")},
    }


def run_weekly(ctx: RunContext, *, progress: bool = True, echo: bool = False) -> dict[str, Any]:
    """Run every built stage for ``ctx``'s run; a finished stage is skipped (its summary kept)."""
    out: dict[str, Any] = {"run_id": ctx.run_id, "root": ctx.store.root, "stages": {}}
    for name, stage in _stages():
        t0 = time.perf_counter()
        if echo:
            print(f"== {name} ==", flush=True)
        summary = stage(ctx, progress)
        summary["wall_s"] = round(time.perf_counter() - t0, 2)
        out["stages"][name] = summary
        if echo:
            _echo_summary(name, summary)
    return out


def _echo_summary(name: str, summary: dict[str, Any]) -> None:
    for key, value in summary.items():
        if isinstance(value, list):
            print(f"  {key}: {len(value)} item(s)")
        elif isinstance(value, dict):
            print(f"  {key}: {{{', '.join(f'{k}: {v}' for k, v in list(value.items())[:6])}{', ...' if len(value) > 6 else ''}}}")
        else:
            print(f"  {key}: {value}")


def run_demo(config: Config, *, root: str | None = None, progress: bool = True, echo: bool = True) -> dict[str, Any]:
    """The demo: for each of ``demo.weeks`` weeks, write that week's drop, then run the weekly
    pipeline on it (run id ``demo__week-NNN``). A week whose run finished is skipped, so a
    second ``make demo`` returns at once (``make clean`` starts over)."""
    from pipeline.corpus import build_demo_corpus, drop_id_for_week

    store = open_store(root, config.storage)
    golden = join("golden", config.demo.golden_version, "manifest.jsonl")
    result: dict[str, Any] = {"root": store.root, "weeks": []}
    for week in range(1, config.demo.weeks + 1):
        drop = drop_id_for_week(week)
        if not store.exists(join("incoming", drop, "manifest.jsonl")):
            if echo:
                print(f"== week {week}: writing drop {drop} (and the golden set) under {store.root} ==", flush=True)
            build_demo_corpus(store, config.demo, config.audio.sample_rate, weeks=week, progress=progress)
        ctx = RunContext(run_id=f"demo__{drop}", config=config, store=store)
        if echo:
            print(f"\n######## weekly run {ctx.run_id} ########", flush=True)
        run = run_weekly(ctx, progress=progress, echo=echo)
        result["weeks"].append(run)
        if echo:
            g = run["stages"].get("gate", {})
            print(f"\ngate decision for {ctx.run_id}: {'PASSED' if g.get('passed') else 'FAILED'}"
                  f" (candidate WER {g.get('candidate_wer')}, production WER {g.get('production_wer')})")
            print(f"on-call report: {g.get('report_uri')}")
            print(f"results of run {ctx.run_id}: {store.uri(ctx.stage_prefix(''))}")
    if echo:
        print(f"\nincoming drops:           {store.uri('incoming')}")
        print(f"golden set:               {store.uri(golden)}")
        print(f"training pool and caches: {store.uri('state')}")
    return result
