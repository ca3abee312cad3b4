"""The weekly run chained in-process, and the demo that runs it week by week.

:func:`run_weekly` calls the stage functions of :data:`pipeline.run.STAGES` in order, as
the Airflow DAG does one task each; :func:`run_demo` writes each week's demo drop and runs
it in-process; :func:`run_demo_airflow` runs the DAG itself (``airflow dags test``, watched
by :mod:`pipeline.demo.dagtest`). Both print one line per stage and end with the table of
weeks (:mod:`pipeline.demo.summary`). For the CLI (``asr-retune demo``) and for tests that
run the chain without Airflow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import PROJECT_ROOT, Config
from pipeline.run import RunContext
from pipeline.storage import ObjectStore, join, open_store

__all__ = ["run_demo", "run_demo_airflow", "run_weekly", "week_table"]


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
    """Run every stage for ``ctx``'s run; a finished stage is skipped (its summary kept).
    ``echo`` prints one line per stage (:func:`pipeline.demo.summary.stage_line`)."""
    from pipeline.demo.summary import stage_line

    out: dict[str, Any] = {"run_id": ctx.run_id, "root": ctx.store.root, "stages": {}}
    for name, stage in _stages():
        t0 = time.perf_counter()
        summary = stage(ctx, progress)
        summary["wall_s"] = round(time.perf_counter() - t0, 2)
        out["stages"][name] = summary
        if echo:
            print(stage_line(name, summary), flush=True)
    return out


def _write_drop(store: ObjectStore, config: Config, week: int, progress: bool) -> str:
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.demo.schedule import drop_id_for_week

    drop = drop_id_for_week(week)
    if not store.exists(join("incoming", drop, "manifest.jsonl")):
        build_demo_corpus(store, config.demo, config.audio.sample_rate, weeks=week, progress=progress)
    return drop


def _week_header(week: int, drop: str) -> str:
    from pipeline.demo.schedule import plan_week

    bad = plan_week(week).mislabelled_share
    note = f" — the recipe's bad drop: {bad:.0%} of its transcripts belong to other audio" if bad else ""
    return f"\n== week {week}: drop {drop}{note} =="


def week_table(store: ObjectStore, config: Config, weeks: list[dict[str, Any]]) -> str:
    """The final table: one row per week (``{"week", "drop", "run_id", "wall_s"}``), from its stage summaries."""
    from pipeline.demo.summary import render_table, week_row

    rows = []
    for w in weeks:
        ctx = RunContext(run_id=w["run_id"], config=config, store=store)
        stages = {s: ctx.summary(s) for s in ("ingest", "search", "gate", "deploy") if ctx.is_complete(s)}
        rows.append(week_row(w["week"], w["drop"], stages, w.get("wall_s")))
    return render_table(rows)


def _print_end(store: ObjectStore, config: Config, weeks: list[dict[str, Any]], extra: list[str]) -> None:
    """Where things are, then the table of weeks (the last thing printed)."""
    golden = join("golden", config.demo.golden_version, "manifest.jsonl")
    print(f"\ngolden set {config.demo.golden_version}: {store.uri(golden)}")
    last = weeks[-1]["run_id"] if weeks else None
    if last and store.exists(join("runs", last, "gate", "report.html")):
        print(f"last gate report: {store.uri(join('runs', last, 'gate', 'report.html'))}")
    for line in extra:
        print(line)
    print("\n" + week_table(store, config, weeks), flush=True)


def run_demo(config: Config, *, root: str | None = None, progress: bool = True, echo: bool = True) -> dict[str, Any]:
    """The demo in-process: for each of ``demo.weeks`` weeks, write that week's drop, then run the
    weekly pipeline on it (run id ``demo__week-NNN``). A week whose run finished is skipped, so a
    second run returns at once (``make clean`` starts over)."""
    store = open_store(root, config.storage)
    result: dict[str, Any] = {"root": store.root, "weeks": []}
    for week in range(1, config.demo.weeks + 1):
        t0 = time.perf_counter()
        drop = _write_drop(store, config, week, progress)
        if echo:
            print(_week_header(week, drop), flush=True)
        ctx = RunContext(run_id=f"demo__{drop}", config=config, store=store)
        run = run_weekly(ctx, progress=progress, echo=echo)
        result["weeks"].append({"week": week, "drop": drop, "run_id": ctx.run_id,
                                "wall_s": round(time.perf_counter() - t0, 1), "stages": run["stages"]})
    if echo:
        _print_end(store, config, result["weeks"], [f"results: {store.uri('runs')}"])
    return result


def run_demo_airflow(config: Config, *, root: str | None = None, progress: bool = True, echo: bool = True) -> dict[str, Any]:
    """The demo through Airflow: for each week, write that week's drop, then run the DAG
    ``asr_weekly_retune`` with ``airflow dags test`` (SQLite metadata in ``.asr-retune/airflow``,
    the run's full log in ``.asr-retune/logs/``). A week whose DAG run finished is skipped
    (``state/demo/week-NNN.json``)."""
    from pipeline.demo.dagtest import airflow_command, airflow_env, record_week, run_week_dag

    store = open_store(root, config.storage)
    home, logs = PROJECT_ROOT / ".asr-retune" / "airflow", PROJECT_ROOT / ".asr-retune" / "logs"
    home.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    env = airflow_env(home, store.root)
    if echo:
        print(f"Airflow metadata: {home} (SQLite); full logs: {logs}/", flush=True)
    airflow_command(env, logs / "airflow-setup.log", "db", "migrate")
    airflow_command(env, logs / "airflow-setup.log", "pools", "set", "asr_compute", "1", "Ray-bound stages of asr_weekly_retune")
    result: dict[str, Any] = {"root": store.root, "weeks": []}
    for week in range(1, config.demo.weeks + 1):
        t0 = time.perf_counter()
        drop = _write_drop(store, config, week, progress)
        marker = join("state", "demo", f"{drop}.json")
        if store.exists(marker):
            done = json.loads(store.get_text(marker))
            result["weeks"].append({**done, "drop": drop})
            if echo:
                print(f"== week {week}: already run ({done['run_id']}); make clean to start over ==")
            continue
        log = logs / f"{drop}.log"
        if echo:
            print(_week_header(week, drop) + f"  (airflow dags test; log: {log})", flush=True)
        ctx = run_week_dag(config, store, env, log, bars=progress and echo)
        wall = time.perf_counter() - t0
        record_week(store, week, drop, ctx, wall)
        result["weeks"].append({"week": week, "drop": drop, "run_id": ctx.run_id, "wall_s": round(wall, 1)})
    if echo:
        _print_end(store, config, result["weeks"], [
            "serving: asr-retune serve status  (then: curl --data-binary @a.wav -H 'Content-Type: audio/wav' "
            "http://127.0.0.1:PORT/predictions/asr)"])
    return result
