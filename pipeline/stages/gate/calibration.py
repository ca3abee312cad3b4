"""The gate's calibration: its pass rates measured by simulation, per golden version.

``tests/benchmarks/bench_gate.py`` trains two models of one configuration (two seeds),
scores both on the golden set and simulates many synthetic candidates from them (a copy of
production with the noise of retraining, uniformly 2 points better, 10 points worse on one
speaker, 1 point worse overall); it writes how often the gate passed each, in both modes,
to ``GateConfig.calibration_file`` (``configs/gate-calibration.json``), keyed by golden
version. The report's footer quotes the entry of the golden version it used, provided the
entry was measured on the same manifest (its sha256); otherwise it says the gate is not
calibrated for that golden set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import GateConfig, project_path

# the settings that change what the rules decide: an entry measured under others is flagged
RULE_FIELDS = ("min_improvement", "tolerance", "min_group_utts", "group_tolerance", "max_group_mde", "confidence",
               "bootstrap_resamples", "max_group_wer")


def calibration_path(cfg: GateConfig) -> Path:
    return project_path(cfg.calibration_file)


def manifest_sha256(manifest_text: str) -> str:
    return hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()


def rule_settings(cfg: GateConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in RULE_FIELDS}


def read_calibration(path: Path, golden_version: str, sha256: str, cfg: GateConfig) -> dict[str, Any]:
    """``{"status": "calibrated", "entry": ..., "config_matches": bool}`` or ``{"status": "not calibrated",
    "reason": ...}`` for this golden version and manifest."""
    if not path.exists():
        return {"status": "not calibrated", "reason": f"no calibration file ({path.name}): run tests/benchmarks/bench_gate.py"}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return {"status": "not calibrated", "reason": f"{path.name} is unreadable ({exc})"}
    entry = table.get(golden_version) if isinstance(table, dict) else None
    if not isinstance(entry, dict):
        return {"status": "not calibrated", "reason": f"{path.name} has no entry for golden version {golden_version}"}
    if entry.get("manifest_sha256") != sha256:
        return {"status": "not calibrated",
                "reason": f"{path.name}'s entry for golden {golden_version} was measured on another manifest"}
    return {"status": "calibrated", "entry": entry, "config_matches": entry.get("gate") == rule_settings(cfg)}


def write_calibration(path: Path, golden_version: str, entry: dict[str, Any]) -> None:
    """Set the entry of ``golden_version`` (other versions are kept)."""
    table: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            table = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            table = {}
    table[golden_version] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(table.items())), indent=2, sort_keys=False) + "\n", encoding="utf-8")
