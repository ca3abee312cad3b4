"""The weekly run chained in-process, and the demo that runs it week by week.

:func:`run_weekly` calls the stage functions of :data:`pipeline.run.STAGES` in order, as
the Airflow DAG does one task each; :func:`run_demo` writes each week's demo drop and runs
it in-process, :func:`run_demo_airflow` runs the DAG itself (``airflow dags test``). For
the CLI (``asr-retune demo``) and for tests that run the chain without Airflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.run import RunContext
from pipeline.storage import join, open_store


def _stages() -> list[tuple[str, Callable[..., dict[str, Any]]]]:
    from pipeline.stages.deploy import deploy_registered
    from pipeline.stages.features import extract_features
    from pipeline.stages.gate import gate
    from pipeline.stages.ingest import ingest
    from pipeline.stages.proxy import sample_proxy
    from pipeline.stages.register import register
    from pipeline.stages.search import load_best_config, search
    from pipeline.stages.train import train_full

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


def run_weekly(ctx: RunContext, *, progress: bool = True, echo: bool = False) -> dict[str, Any]:
    """Run every stage for ``ctx``'s run; a finished stage is skipped (its summary kept)."""
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
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.demo.schedule import drop_id_for_week

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


def run_demo_airflow(config: Config, *, root: str | None = None, progress: bool = True, echo: bool = True) -> dict[str, Any]:
    """The demo through Airflow: for each week, write that week's drop, then run the DAG
    ``asr_weekly_retune`` with ``airflow dags test`` (SQLite metadata in ``.asr-retune/airflow``).
    A week whose DAG run finished is skipped (``state/demo/week-NNN.json``)."""
    import json
    import os
    import subprocess
    import sys

    from pipeline.config import PROJECT_ROOT
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.demo.schedule import drop_id_for_week

    store = open_store(root, config.storage)
    airflow = str(Path(sys.executable).with_name("airflow"))
    home = PROJECT_ROOT / ".asr-retune" / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(PROJECT_ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(PROJECT_ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        ASR_RETUNE__STORAGE__ROOT=store.root,
    )

    def airflow_cmd(*args: str) -> None:
        done = subprocess.run([airflow, *args], env=env, cwd=PROJECT_ROOT, text=True,
                              stdout=None if echo else subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"airflow {' '.join(args[:3])} failed with exit code {done.returncode}")

    if echo:
        print(f"== Airflow: metadata in {home} (SQLite) ==", flush=True)
    airflow_cmd("db", "migrate")
    airflow_cmd("pools", "set", "asr_compute", "1", "Ray-bound stages of asr_weekly_retune")
    result: dict[str, Any] = {"root": store.root, "weeks": []}
    for week in range(1, config.demo.weeks + 1):
        drop = drop_id_for_week(week)
        marker = join("state", "demo", f"{drop}.json")
        if store.exists(marker):
            result["weeks"].append(json.loads(store.get_text(marker)))
            if echo:
                print(f"== week {week}: already run ({store.uri(marker)}); make clean to start over ==")
            continue
        if not store.exists(join("incoming", drop, "manifest.jsonl")):
            if echo:
                print(f"== week {week}: writing drop {drop} under {store.root} ==", flush=True)
            build_demo_corpus(store, config.demo, config.audio.sample_rate, weeks=week, progress=progress)
        before = set(store.list_dirs("runs"))
        if echo:
            print(f"\n######## week {week}: airflow dags test asr_weekly_retune ########", flush=True)
        airflow_cmd("dags", "test", "asr_weekly_retune", "-c", "{}")
        new = sorted(set(store.list_dirs("runs")) - before)
        if not new:
            raise RuntimeError("the DAG run wrote no run partition")
        ctx = RunContext(run_id=new[-1], config=config, store=store)
        summary = {"week": week, "run_id": ctx.run_id, "stages": {}}
        for stage in ("ingest", "search", "train", "gate", "register", "deploy"):
            if ctx.is_complete(stage):
                summary["stages"][stage] = ctx.summary(stage)
        store.put_text(marker, json.dumps({"week": week, "run_id": ctx.run_id}))
        result["weeks"].append(summary)
        if echo:
            g = summary["stages"].get("gate", {})
            d = summary["stages"].get("deploy", {})
            print(f"\ngate decision for {ctx.run_id}: {'PASSED' if g.get('passed') else 'FAILED'}"
                  f" (candidate WER {g.get('candidate_wer')}, production WER {g.get('production_wer')})")
            print(f"on-call report: {g.get('report_uri')}")
            if d:
                print(f"canary: {d.get('outcome')} ({d.get('reason')})")
    if echo:
        print(f"\nincoming drops: {store.uri('incoming')}\ngolden set:     {store.uri(join('golden', config.demo.golden_version, 'manifest.jsonl'))}")
        print("serving: asr-retune serve status   (router address; then: curl --data-binary @a.wav -H 'Content-Type: audio/wav' http://127.0.0.1:PORT/predictions/asr)")
    return result
