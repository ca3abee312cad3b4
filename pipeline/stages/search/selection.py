"""The leaderboard of a search, and the selection of the configuration full training gets.

Every trial is a row: its curve, its status (``completed``: reached the top rung;
``asha_stopped``, ``diverged``, ``error``), its source (``production`` or ``config-default``
for the incumbent, ``run:ID`` for an earlier run's best, else none) and its top-rung result.
Rows that reached the top rung come first, ranked by dev WER there with dev CER as
tie-breaker; the others follow by their best value of the search metric. Only a row that
reached the top rung can win.

:func:`select` compares the best of the others with the incumbent at the top rung: the winner
replaces the incumbent only if its dev WER there is at least ``min_improvement`` lower;
otherwise full training uses the incumbent's configuration on the new data. The decision and
its reason are part of the search summary and of ``best_config.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.stages.search.incumbent import INCUMBENT_KEY, WARM_START_KEY
from pipeline.stages.search.trial import DIVERGED_WER

WINNER, INCUMBENT_KEPT = "winner", "incumbent-kept"
RANK = {"completed": 0, "asha_stopped": 1, "diverged": 2, "error": 3}


def _curve(df, column: str) -> list[tuple[int, float]]:
    if df is None or column not in df or "epoch" not in df:
        return []
    seen: dict[int, float] = {}
    for epoch, value in zip(df["epoch"], df[column]):
        if not (isinstance(epoch, float) and math.isnan(epoch)):
            seen[int(epoch)] = float(value)
    return sorted(seen.items())


def _status(result, diverged: bool, epochs_run: int, max_t: int) -> str:
    if result.error is not None:
        return "error"
    if diverged:
        return "diverged"
    return "completed" if epochs_run >= max_t else "asha_stopped"


def _top_rung(curves: dict[str, list[tuple[int, float]]], max_t: int) -> dict[str, Any] | None:
    at = {name: dict(c).get(max_t) for name, c in curves.items()}
    if at["dev_wer"] is None:
        return None
    return {"epoch": max_t, **{k: v for k, v in at.items() if v is not None}}


def trial_id_of(result) -> str | None:
    """A Tune ``Result``'s trial id (its reported ``trial_id``, else its folder's name)."""
    return (result.metrics or {}).get("trial_id") or (Path(result.path).name if result.path else None)


def trial_row(result, max_t: int, metric: str) -> dict[str, Any]:
    """One leaderboard row from a Tune ``Result``."""
    df = result.metrics_dataframe
    curves = {name: _curve(df, name) for name in ("dev_wer", "dev_cer", "dev_loss", "score")}
    curve, metric_curve = curves["dev_wer"], _curve(df, metric)
    metrics = result.metrics or {}
    diverged = bool(metrics.get("diverged"))
    epochs_run = curve[-1][0] if curve else 0
    status = _status(result, diverged, epochs_run, max_t)
    wers = [w for _, w in curve if not diverged or w < DIVERGED_WER]
    values = [v for _, v in metric_curve if not diverged]
    config = dict(result.config or {})
    top = _top_rung(curves, max_t) if status == "completed" else None
    tag = str(metrics.get("experiment_tag", "")).split("_", 1)[0]
    return {
        "trial_id": trial_id_of(result),
        "trial_number": int(tag) if tag.isdigit() else None,
        "source": config.get(INCUMBENT_KEY) or config.get(WARM_START_KEY),
        "incumbent": bool(config.get(INCUMBENT_KEY)),
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
        "top_rung": top,
        "top_rung_dev_wer": top["dev_wer"] if top else None,  # a scalar for tables (the gate report's)
        "best_dev_wer": min(wers) if wers else None,
        "metric": metric,
        "best_metric": min(values) if values else None,
        "last_dev_wer": curve[-1][1] if curve else None,
        "epochs": epochs_run,
        "status": status,
        "stop_reason": status if status != "error" else f"error: {str(result.error).splitlines()[0][:200]}",
        "curve": curve,
        "metric_curve": metric_curve,
        "resumed_from": sorted({int(v) for v in df["resumed_from"] if v == v and v > 0})
        if df is not None and "resumed_from" in df else [],
        "trial_seconds": float(sum(df["seconds"])) if df is not None and "seconds" in df else 0.0,
    }


def rank_key(row: dict[str, Any]) -> tuple:
    top = row.get("top_rung")
    if top is not None:
        return (0, top["dev_wer"], top.get("dev_cer", math.inf), row["trial_number"] or 0)
    best = row["best_metric"]
    return (1, RANK[row["status"]], best is None, best if best is not None else 0.0, row["trial_number"] or 0)


def leaderboard(results, max_t: int, metric: str) -> list[dict[str, Any]]:
    """Rows of every trial, best first (top-rung rows by dev WER then CER, then the rest)."""
    return sorted((trial_row(r, max_t, metric) for r in results), key=rank_key)


def _pts(x: float) -> str:
    return f"{100 * x:.2f}%"


def select(board: list[dict[str, Any]], min_improvement: float) -> dict[str, Any]:
    """Winner or incumbent, and why: ``{"decision", "reason", "winner", "incumbent", ...}``."""
    incumbent = next((r for r in board if r["incumbent"]), None)
    others = [r for r in board if not r["incumbent"] and r["top_rung"] is not None]
    best = others[0] if others else None  # the board is ranked
    out: dict[str, Any] = {
        "incumbent": incumbent["trial_id"] if incumbent else None,
        "incumbent_source": incumbent["source"] if incumbent else None,
        "incumbent_dev_wer": (incumbent["top_rung"] or {}).get("dev_wer") if incumbent else None,
        "winner": best["trial_id"] if best else None,
        "winner_dev_wer": best["top_rung"]["dev_wer"] if best else None,
        "margin": min_improvement,
    }
    if incumbent is None or incumbent["top_rung"] is None:
        status = incumbent["status"] if incumbent else "missing"
        return {**out, "decision": INCUMBENT_KEPT, "reason": (
            f"the incumbent did not reach the top rung ({status}): nothing to compare with, "
            "so full training keeps the incumbent's configuration")}
    inc_wer = incumbent["top_rung"]["dev_wer"]
    if best is None:
        return {**out, "decision": INCUMBENT_KEPT,
                "reason": f"no other trial reached the top rung; the incumbent scored {_pts(inc_wer)} dev WER there"}
    gain = inc_wer - best["top_rung"]["dev_wer"]
    versus = (f"trial {best['trial_id']}: {_pts(best['top_rung']['dev_wer'])} dev WER at the top rung "
              f"(epoch {best['top_rung']['epoch']}) vs the incumbent's {_pts(inc_wer)}")
    if gain >= min_improvement - 1e-12:
        return {**out, "decision": WINNER,
                "reason": f"{versus}: {100 * gain:.2f} pts better, at least the {100 * min_improvement:.2f}-pt margin"}
    return {**out, "decision": INCUMBENT_KEPT, "reason": (
        f"{versus}: {100 * gain:+.2f} pts, under the {100 * min_improvement:.2f}-pt margin: "
        "full training keeps the incumbent's configuration")}


def chosen_row(board: list[dict[str, Any]], selection: dict[str, Any]) -> dict[str, Any] | None:
    want = selection["winner"] if selection["decision"] == WINNER else selection["incumbent"]
    return next((r for r in board if r["trial_id"] == want), None)
