"""Fixtures for the infra tests: the lint toolchain (.venv-lint) and the rendered manifests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import render_manifests  # noqa: E402


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def lint_bin() -> Path:
    """.venv-lint/bin, set up by tools/lint.sh --setup-only (a no-op once installed)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "lint.sh"), "--setup-only"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, f"tools/lint.sh --setup-only failed:\n{proc.stdout}\n{proc.stderr}"
    return ROOT / ".venv-lint" / "bin"


@pytest.fixture(scope="session")
def manifests() -> list[dict]:
    text, _how = render_manifests.render(ROOT / "infra" / "k8s" / "base")
    return render_manifests.load_documents(text)
