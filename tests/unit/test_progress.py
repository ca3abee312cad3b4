"""pipeline.progress: the bar's state reaches a watcher in another process through the file."""

from __future__ import annotations

import subprocess
import sys

from pipeline.progress import PROGRESS_ENV, Progress, read_progress


def test_progress_file_follows_updates_and_marks_done(tmp_path):
    path = tmp_path / "p.json"
    bar = Progress("train", 3, "epoch", enabled=False, path=str(path))
    assert read_progress(path)["n"] == 0
    bar.update(1, dev_wer="0.5")
    bar.update(2)  # the last step is always written, however soon after the previous one
    state = read_progress(path)
    assert (state["desc"], state["n"], state["total"], state["unit"]) == ("train", 3, 3, "epoch")
    assert state["figures"] == {"dev_wer": "0.5"} and not state["done"]
    bar.close()
    assert read_progress(path)["done"] is True


def test_progress_env_names_the_file_for_a_child_process(tmp_path):
    path = tmp_path / "child.json"
    code = "from pipeline.progress import Progress\nwith Progress('search', 4, 'trial', enabled=False) as b: b.update(4)\n"
    subprocess.run([sys.executable, "-c", code], check=True, env={PROGRESS_ENV: str(path), "PATH": ""})
    state = read_progress(path)
    assert state["n"] == 4 and state["done"] is True


def test_no_file_without_env_or_path(tmp_path, monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with Progress("x", 2, enabled=False) as bar:
        bar.update(2)
    assert list(tmp_path.iterdir()) == []
    assert read_progress(tmp_path / "missing.json") is None
