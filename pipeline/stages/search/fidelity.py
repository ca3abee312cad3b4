"""The proxy-fidelity check: does the proxy rank configurations the way full training does?

The top-k trials of the leaderboard (those that reached the top rung first, by dev WER there,
then the stopped ones by their best value; errored and diverged ones left out) are each trained
again on the full pool (the train stage's split of it, ``train.dev_fraction``/``train.seed``,
for ``train.epochs`` at full training's global batch, ``train.batch_size × train.num_workers``:
one Tune trial each, the same trial function), and the Spearman rank
correlation between the proxy's ranking and their full-training dev WER (best epoch, as the
train stage exports) says how far the proxy can be trusted. It costs k full
trainings, so the search runs it only when ``search.fidelity_top_k >= 2``; the benchmark
(``tests/benchmarks/bench_search.py``) measures it. Below ``search.fidelity_floor`` the
search summary carries an alert.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from pipeline.run import RunContext

log = logging.getLogger(__name__)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); ``None`` below 2 pairs or when
    either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def top_rows(board: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The best ``k`` rows that trained normally (the board is ranked)."""
    return [r for r in board if r["status"] in ("completed", "asha_stopped")][:k]


def _proxy_wer(row: dict[str, Any]) -> float | None:
    return row["top_rung"]["dev_wer"] if row["top_rung"] else row["last_dev_wer"]


def measure_fidelity(ctx: RunContext, data: dict[str, Any], board: list[dict[str, Any]], k: int,
                     floor: float, known: dict[str, float] | None = None) -> dict[str, Any]:
    """Train the top-k configurations on the full pool; their proxy/full rank correlation.
    ``known``: full-training dev WERs already measured (trial id -> WER), not trained again."""
    from pipeline.stages.search.tuner import fidelity_tuner

    rows = top_rows(board, k)
    out: dict[str, Any] = {"k": k, "floor": floor, "trials": [], "spearman": None, "below_floor": False}
    if len(rows) < 2:
        return {**out, "note": f"{len(rows)} usable trial(s): nothing to correlate"}
    epochs, known = ctx.config.train.epochs, known or {}
    full = {**data, "split": "full", "max_epochs": epochs, "warmup_scale": 1.0, "checkpoint_epochs": [epochs],
            "batch_scale": ctx.config.train.num_workers}
    full_wer = {i: float(known[r["trial_id"]]) for i, r in enumerate(rows) if r["trial_id"] in known}
    todo = [r["config"] for i, r in enumerate(rows) if i not in full_wer]
    grid = fidelity_tuner(ctx, full, todo).fit() if todo else []
    for i in range(len(grid)):
        res = grid[i]
        config = (res.config or {}).get("_fidelity")
        df = res.metrics_dataframe
        if res.error is None and df is not None and "dev_wer" in df and len(df):
            idx = next((j for j, r in enumerate(rows) if r["config"] == config), None)
            if idx is not None:
                full_wer[idx] = float(min(df["dev_wer"]))
    pairs = [(i, rows[i], full_wer[i]) for i in sorted(full_wer)]
    out["trials"] = [{"trial_id": r["trial_id"], "source": r["source"], "proxy_rank": i + 1, "status": r["status"],
                      "epochs": r["epochs"], "proxy_dev_wer": _proxy_wer(r), "full_dev_wer": w} for i, r, w in pairs]
    rho = spearman([float(i) for i, _, _ in pairs], [w for _, _, w in pairs])
    out["spearman"] = None if rho is None else round(rho, 4)
    out["below_floor"] = rho is not None and rho < floor
    return out


def fidelity_alert(fidelity: dict[str, Any]) -> dict[str, Any] | None:
    """The alert (also logged as a warning) when the correlation is below the floor."""
    if not fidelity.get("below_floor"):
        return None
    message = (f"proxy fidelity: Spearman {fidelity['spearman']:+.2f} between the proxy's ranking and full-training dev WER over "
               f"the top {len(fidelity['trials'])} trials is below search.fidelity_floor={fidelity['floor']:+.2f}: "
               "the proxy does not rank configurations as full training does (enlarge proxy.fraction or "
               "search.top_rung_fraction)")
    log.warning(message)
    return {"kind": "proxy-fidelity", "severity": "warning", "message": message}
