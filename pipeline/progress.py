"""Progress of a long step (trials, epochs, utterances), for whoever is watching.

A :class:`Progress` draws a tqdm bar on stderr when ``enabled`` (a person at a terminal
running the CLI). When the environment names a progress file (:data:`PROGRESS_ENV`), it also
keeps that small JSON file up to date, so a watcher in another process can draw the bar:
``make demo`` runs each week as an Airflow DAG whose tasks (and their Ray workers) are not
the process at the terminal, so the demo's driver sets the variable and reads the file
(:func:`read_progress`). One writer per step: the stage's own process, or DDP rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["PROGRESS_ENV", "Progress", "progress_file", "read_progress"]

PROGRESS_ENV = "ASR_RETUNE_PROGRESS_FILE"
_MIN_INTERVAL_S = 0.5


def progress_file() -> str | None:
    """The progress file named by the environment, or ``None``."""
    return os.environ.get(PROGRESS_ENV) or None


class Progress:
    """``total`` steps of ``desc`` counted in ``unit``; ``update(n, **figures)`` after each.

    ``path`` (default: :func:`progress_file`) is the watcher's file; ``None`` writes none.
    Usable as a context manager; :meth:`close` marks the step done.
    """

    def __init__(self, desc: str, total: int | None, unit: str = "it", *, enabled: bool = True,
                 path: str | None = "env") -> None:
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.figures: dict[str, Any] = {}
        if path == "env":
            path = progress_file()
        self._path = Path(path) if path else None
        self._written = 0.0
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False)
        self._write(force=True)

    def update(self, n: int = 1, **figures: Any) -> None:
        self.n += n
        self.figures.update(figures)
        self._bar.update(n)
        if figures:
            self._bar.set_postfix(figures, refresh=False)
        self._write(force=self.total is not None and self.n >= self.total)

    def close(self) -> None:
        self._bar.close()
        self._write(force=True, done=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, *, force: bool = False, done: bool = False) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if not force and now - self._written < _MIN_INTERVAL_S:
            return
        self._written = now
        state = {"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                 "figures": self.figures, "done": done, "pid": os.getpid(), "time": time.time()}
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(state, default=str), encoding="utf-8")
            os.replace(tmp, self._path)
        except OSError:
            self._path = None  # progress is a courtesy: never fail the step for it


def read_progress(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last state written to ``path``, or ``None`` when there is none (or it is being replaced)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
