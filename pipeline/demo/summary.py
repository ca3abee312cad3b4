"""What the demo prints about a weekly run, built from the stages' summaries (``_SUCCESS``).

:func:`stage_line` is one line per finished stage, with its time and key figures;
:func:`week_row` gathers one week's row of the final table and :func:`render_table` draws
the rows. Nothing here parses logs: a summary that lacks a figure shows ``-``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from pipeline.asr.metrics import format_pct

__all__ = ["WeekRow", "render_table", "stage_line", "week_row"]

_NONE = "-"


def _pct(x: Any) -> str:
    return format_pct(x) if isinstance(x, (int, float)) else _NONE


def _pts(x: Any) -> str:
    return f"{100.0 * x:+.1f}" if isinstance(x, (int, float)) else _NONE


def _interval(s: Mapping[str, Any]) -> str:
    """ΔWER and its interval in points: ``-24.3 [-27.7, -20.8]``."""
    ci = s.get("delta_ci") or [None, None]
    if not isinstance(s.get("delta_wer"), (int, float)):
        return _NONE
    return f"{_pts(s['delta_wer'])} [{_pts(ci[0])}, {_pts(ci[1])}]"


def _pct1(x: Any) -> str:
    return f"{100.0 * x:.1f}%" if isinstance(x, (int, float)) else _NONE


def _search_brief(s: Mapping[str, Any]) -> str:
    sel = s.get("selection") or {}
    won = sel.get("decision") == "winner"
    winner, incumbent = _pct1(sel.get("winner_dev_wer")), _pct1(sel.get("incumbent_dev_wer"))
    return f"{winner} vs {incumbent}: {'winner' if won else 'incumbent kept'}"


def _canary_brief(s: Mapping[str, Any]) -> str:
    if not s.get("steps") and s.get("reason") == "cold_start":
        return f"none (cold) {s.get('outcome', '')}".strip()
    steps = [f"{float(st['weight']):g}" for st in s.get("steps") or [] if st.get("result") == "passed"]
    return f"{'→'.join(steps) or 'no step'} {s.get('outcome', '')}".strip()


def _line_ingest(s: Mapping[str, Any]) -> str:
    quarantined = s.get("quarantined") or []
    return (f"+{s.get('accepted', 0)} accepted, {len(quarantined)} quarantined"
            f" from {', '.join(s.get('drops') or []) or 'no new drop'} · pool {s.get('pool_size', _NONE)}")


def _line_features(s: Mapping[str, Any]) -> str:
    return f"{s.get('utterances', _NONE)} utts ({s.get('computed', 0)} computed, {s.get('reused', 0)} from the cache)"


def _line_proxy(s: Mapping[str, Any]) -> str:
    return (f"proxy {s.get('proxy_size', _NONE)} of {s.get('pool_size', _NONE)} utts"
            f" (train {s.get('train_size', _NONE)}, dev {s.get('dev_size', _NONE)})")


def _line_search(s: Mapping[str, Any]) -> str:
    st = s.get("statuses") or {}
    done = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in st.items() if v)
    return f"{s.get('trials', _NONE)} trials ({done or 'none finished'}) · top-rung dev WER {_search_brief(s)}"


def _line_train(s: Mapping[str, Any]) -> str:
    return (f"{s.get('epochs', _NONE)} epochs on {s.get('n_train', _NONE)} utts, {s.get('workers', _NONE)} DDP workers"
            f" · dev WER {_pct(s.get('dev_wer'))} (best epoch {s.get('best_epoch', _NONE)})")


def _line_gate(s: Mapping[str, Any]) -> str:
    verdict = "PASSED" if s.get("passed") else "FAILED"
    if s.get("cold_start"):
        return f"{verdict} (cold start: absolute rules) · candidate {_pct(s.get('candidate_wer'))} on golden {s.get('golden_version')}"
    failing = f" ({', '.join(s.get('failing_rules') or [])})" if not s.get("passed") else ""
    return (f"{verdict}{failing} · candidate {_pct(s.get('candidate_wer'))} vs production v{s.get('production_version')}"
            f" {_pct(s.get('production_wer'))} · ΔWER {_interval(s)} pts")


def _line_register(s: Mapping[str, Any]) -> str:
    if not s.get("registered", True):
        return f"not registered ({s.get('reason', _NONE)})"
    return f"{s.get('model_uri', _NONE)} (alias {s.get('alias', _NONE)})"


def _line_deploy(s: Mapping[str, Any]) -> str:
    if s.get("deployed") is False:
        return f"not deployed ({s.get('reason', _NONE)})"
    reason = "" if s.get("reason") == "cold_start" else f": {s.get('reason', _NONE)}"
    return f"canary {_canary_brief(s)}{reason} · serving v{s.get('default_version', _NONE)}"


_LINES = {"ingest": _line_ingest, "features": _line_features, "proxy": _line_proxy, "search": _line_search,
          "train": _line_train, "gate": _line_gate, "register": _line_register, "deploy": _line_deploy}


def stage_line(stage: str, summary: Mapping[str, Any], wall_s: float | None = None) -> str:
    """``  train      2m37s  15 epochs on 1104 utts, ...``: one line for a finished stage."""
    wall = wall_s if wall_s is not None else summary.get("wall_s")
    brief = _LINES.get(stage, lambda s: "done")(summary)
    return f"  {stage:<9}{_duration(wall):>7}  {brief}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass(frozen=True)
class WeekRow:
    """One week of the final table."""

    week: str
    drop: str
    pool: str
    search: str
    candidate: str
    production: str
    delta: str
    decision: str
    canary: str
    serving: str
    wall: str


_HEADERS = {
    "week": "week", "drop": "drop", "pool": "pool", "search": "search dev WER: winner vs incumbent",
    "candidate": "candidate", "production": "production", "delta": "ΔWER pts [95% CI]",
    "decision": "gate", "canary": "canary %", "serving": "serving", "wall": "time",
}


def week_row(week: int, drop: str, stages: Mapping[str, Mapping[str, Any]], wall_s: float | None = None) -> WeekRow:
    """The row of week ``week`` from its stage summaries (``stages[name]``: the ``_SUCCESS`` summary)."""
    ingest, search, gate, deploy = (stages.get(k) or {} for k in ("ingest", "search", "gate", "deploy"))
    if gate:
        decision = ("PASSED" if gate.get("passed") else "FAILED") + (" (cold)" if gate.get("cold_start") else "")
    else:
        decision = "not reached"
    promoted = deploy.get("outcome") == "promoted"
    serving = deploy.get("version") if promoted else gate.get("production_version")
    return WeekRow(
        week=str(week),
        drop=drop,
        pool=f"{ingest.get('pool_size', _NONE)} (+{ingest.get('accepted', 0)})" if ingest else _NONE,
        search=_search_brief(search) if search else _NONE,
        candidate=_pct1(gate.get("candidate_wer")),
        production=(f"v{gate['production_version']} " if gate.get("production_version") else "") + _pct1(gate.get("production_wer")),
        delta=_interval(gate) if gate else _NONE,
        decision=decision,
        canary=_canary_brief(deploy) if deploy else _NONE,
        serving=f"v{serving}" if serving else "none",
        wall=_duration(wall_s),
    )


def render_table(rows: Sequence[WeekRow]) -> str:
    """The rows as an aligned text table with a header line."""
    names = [f.name for f in fields(WeekRow)]
    cells = [[_HEADERS[n] for n in names]] + [[getattr(r, n) for n in names] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(names))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(names))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
