"""The demo through Airflow: each week's drop, then ``airflow dags test asr_weekly_retune``,
watched from outside.

The DAG run's own output (Airflow's task runner, Ray's workers) goes to
``.asr-retune/logs/week-NNN.log``. The terminal gets one line per stage as its ``_SUCCESS``
appears in the run's partition (:mod:`pipeline.demo.summary`), a progress bar drawn from the
file the stages keep up to date (:mod:`pipeline.progress`), and, when the run fails, the
failing task and the last lines of the log. A week whose DAG run finished is not run again
(``state/demo/week-NNN.json``); ``make clean`` starts over.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from pipeline.config import PROJECT_ROOT, Config
from pipeline.progress import PROGRESS_ENV, read_progress
from pipeline.run import STAGES, RunContext
from pipeline.storage import ObjectStore, join

__all__ = ["DagRunFailed", "airflow_command", "airflow_env", "failed_stage", "record_week", "run_week_dag", "tail"]

DAG_ID = "asr_weekly_retune"
LOG_TAIL_LINES = 15
_POLL_S = 0.5


class DagRunFailed(RuntimeError):
    """A week's DAG run failed; the message names the failing task and the log."""


def airflow_env(home: Path, store_root: str) -> dict[str, str]:
    """The environment of the demo's Airflow: SQLite metadata in ``home``, this project's DAGs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(PROJECT_ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(PROJECT_ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        ASR_RETUNE__STORAGE__ROOT=store_root,
    )
    return env


def airflow_command(env: dict[str, str], log: Path, *args: str) -> None:
    """Run ``airflow ARGS`` with its output appended to ``log``; a failure names the log."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    with log.open("a", encoding="utf-8") as out:
        done = subprocess.run([airflow, *args], env=env, cwd=PROJECT_ROOT, text=True, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise DagRunFailed(f"airflow {' '.join(args[:3])} failed (exit {done.returncode}); see {log}\n{tail(log)}")


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path``, indented."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            last = deque(f, maxlen=lines)
    except OSError:
        return ""
    return "".join(f"    | {line[:200].rstrip()}\n" for line in last).rstrip("\n")


class _Watcher:
    """Prints each stage of one run as it finishes, and draws the progress file as a bar."""

    def __init__(self, store: ObjectStore, config: Config, before: set[str], progress_path: Path,
                 out: TextIO, bars: bool) -> None:
        self.store, self.config, self.before, self.out, self.bars = store, config, before, out, bars
        self.progress_path = progress_path
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.ctx: RunContext | None = None
        self.printed: list[str] = []
        self.last_t = time.monotonic()
        self.bar: tqdm | None = None
        self.bar_key: tuple[Any, ...] | None = None

    def poll(self) -> None:
        if self.ctx is None:
            new = sorted(set(self.store.list_dirs("runs")) - self.before)
            if not new:
                return
            self.ctx = RunContext(run_id=new[-1], config=self.config, store=self.store)
        for stage in STAGES:
            if stage in self.printed or not self.ctx.is_complete(stage):
                continue
            now = time.monotonic()
            self._close_bar()
            from pipeline.demo.summary import stage_line

            print(stage_line(stage, self.ctx.summary(stage), now - self.last_t), file=self.out, flush=True)
            self.printed.append(stage)
            self.last_t = now
        self._draw_progress()

    def _draw_progress(self) -> None:
        state = read_progress(self.progress_path) if self.bars else None
        if not state or state.get("done"):
            self._close_bar()
            return
        key = (state.get("desc"), state.get("total"), state.get("pid"))
        if key != self.bar_key:
            self._close_bar()
            self.bar = tqdm(total=state.get("total"), desc=f"  {state.get('desc')}", unit=state.get("unit") or "it",
                            file=self.out, leave=False, dynamic_ncols=True, mininterval=1.0)
            self.bar_key = key
        assert self.bar is not None
        n = int(state.get("n") or 0)
        if n == self.bar.n and not self.tty:
            return  # in a file or a pipe, the bar is redrawn only when it moves
        self.bar.n = n
        self.bar.set_postfix(state.get("figures") or {}, refresh=False)
        self.bar.refresh()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_key = None, None


def run_week_dag(config: Config, store: ObjectStore, env: dict[str, str], log: Path, *,
                 conf: dict[str, Any] | None = None, out: TextIO = sys.stdout, bars: bool = True) -> RunContext:
    """``airflow dags test`` of one week (``conf``: the run's parameters), its output in ``log``;
    returns the run's context.

    Raises :class:`DagRunFailed` naming the failing task (the first stage that did not
    finish, unless the gate refused the candidate) and the last lines of ``log``."""
    progress_path = log.with_suffix(".progress.json")
    progress_path.unlink(missing_ok=True)
    watcher = _Watcher(store, config, set(store.list_dirs("runs")), progress_path, out, bars)
    airflow = str(Path(sys.executable).with_name("airflow"))
    with log.open("w", encoding="utf-8") as sink, _terminate_on_sigterm():
        proc = subprocess.Popen([airflow, "dags", "test", DAG_ID, "-c", json.dumps(conf or {})], cwd=PROJECT_ROOT, text=True,
                                env={**env, PROGRESS_ENV: str(progress_path)}, stdout=sink, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                watcher.poll()
                time.sleep(_POLL_S)
        except BaseException:
            proc.terminate()
            proc.wait(timeout=60)
            raise
        finally:
            watcher.poll()
            watcher._close_bar()
    if watcher.ctx is None:
        raise DagRunFailed(f"the DAG run wrote no run partition (exit {proc.returncode}); see {log}\n{tail(log)}")
    failed = failed_stage(watcher.ctx)
    if proc.returncode or failed:
        raise DagRunFailed(f"task {failed or '?'} of run {watcher.ctx.run_id} failed"
                           f" (airflow exit {proc.returncode}); log: {log}\n{tail(log)}")
    return watcher.ctx


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM to the demo ends its DAG run too (as Ctrl-C does): it raises ``SystemExit`` here."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def failed_stage(ctx: RunContext) -> str | None:
    """The first stage that should have finished and did not (register and deploy only run after a pass)."""
    for stage in STAGES:
        if ctx.is_complete(stage):
            continue
        if stage in ("register", "deploy") and ctx.is_complete("gate") and not ctx.summary("gate").get("passed"):
            return None
        return stage
    return None


def record_week(store: ObjectStore, week: int, drop: str, ctx: RunContext, wall_s: float) -> None:
    store.put_text(join("state", "demo", f"{drop}.json"),
                   json.dumps({"week": week, "run_id": ctx.run_id, "wall_s": round(wall_s, 1)}))
