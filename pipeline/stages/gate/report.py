"""The on-call gating report: one self-contained HTML file (inline CSS and SVG) plus Markdown.

Written by the gate stage to ``runs/{run_id}/gate/report.html`` and ``report.md``. Top to
bottom: the decision in big letters with the failing rules and what to do next, the rule
table, what the golden set can and cannot detect, per-group ΔWER with its Holm-adjusted
interval and verdict (a forest plot and a table) and per-group WER, the ΔWER bootstrap
distribution (blockwise, with the utterance-level one beside it), the utterances whose
errors changed most (reference and both hypotheses), the head of the search leaderboard
and the training curves; the footer quotes the gate's calibrated pass rates for the golden
version (:mod:`pipeline.stages.gate.calibration`). The pages are the Jinja2 templates in
``templates/`` (``report.html.j2`` with ``report.css.j2`` and ``forest.svg.j2``, and
``report.md.j2``); this module computes what they show, :mod:`pipeline.stages.gate.charts`
draws the charts as inline SVG: the file opens offline.
"""

from __future__ import annotations

import difflib
import functools
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from pipeline.asr.metrics import UttScore, format_pct, format_points
from pipeline.stages.gate.charts import bootstrap_chart, forest_plot, group_chart, is_number, training_chart

_PREFERRED_LEADERBOARD = ("trial_id", "source", "status", "top_rung_dev_wer", "best_dev_wer", "last_dev_wer", "epochs",
                         "metric", "best_metric", "stop_reason")
RULE_TITLES = {
    "finite_outputs": "No NaN/Inf in the candidate's outputs",
    "wer_ceiling": "Candidate WER under the ceiling",
    "rtf_budget": "Real-time factor within budget",
    "group_wer_ceiling": "Every group's WER under the ceiling",
    "coverage": "Scored on the whole golden set",
    "delta_wer": "ΔWER vs production (blockwise CI)",
    "worst_group": "No group with evidence of regression (Holm-adjusted)",
}


@dataclass
class ReportInputs:
    decision: dict[str, Any]
    candidate: Sequence[UttScore]
    production: Sequence[UttScore] | None
    bootstrap_samples: Sequence[float] = ()  # blockwise (the rule's)
    leaderboard: list[dict[str, Any]] | None = None
    history: list[dict[str, Any]] | None = None
    top_utts: int = 15
    leaderboard_rows: int = 10
    notes: list[str] = field(default_factory=list)
    utterance_samples: Sequence[float] = ()  # utterance-level, shown beside it
    search_selection: dict[str, Any] | None = None  # the search's winner-vs-incumbent decision


def render_html(inp: ReportInputs) -> str:
    """The report as one self-contained HTML page."""
    ctx = _context(inp)
    ctx["charts"] = {
        "groups": group_chart(inp.decision.get("groups", [])),
        "bootstrap": bootstrap_chart(inp.bootstrap_samples, inp.decision, inp.utterance_samples),
        "training": training_chart(ctx["history"]),
    }
    ctx["forest"] = forest_plot(inp.decision.get("groups", []),
                                (inp.decision.get("config") or {}).get("group_tolerance", 0.0))
    return _environment().get_template("report.html.j2").render(ctx)


def render_markdown(inp: ReportInputs) -> str:
    """The report as Markdown (no charts)."""
    return _environment().get_template("report.md.j2").render(_context(inp))


# --------------------------------------------------------------------------- what the templates show


def _context(inp: ReportInputs) -> dict[str, Any]:
    d = inp.decision
    head, cls = verdict(d)
    boot = d.get("bootstrap") or {}
    meta = (d.get("golden") or {}).get("meta") or {}
    return {
        "d": d,
        "head": head,
        "verdict_class": cls,
        "mark": "✅" if d.get("passed") and not d.get("forced") else ("⚠️" if d.get("forced") else "❌"),
        "prod": d.get("production"),
        "has_production": inp.production is not None,
        "cand": d.get("candidate") or {},
        "golden": d.get("golden") or {},
        "boot": boot,
        "confidence": f"{100 * boot.get('confidence', 0.95):.0f}",
        "rules": d.get("rules", []),
        "failing": [r for r in d.get("rules", []) if not r["passed"]],
        "skipped": d.get("skipped_rules", []),
        "has_group_ceiling": any(r["name"] == "group_wer_ceiling" for r in d.get("rules", [])),
        "groups": sorted(d.get("groups", []), key=lambda g: (g["kind"] != "cohort", g["kind"], g["key"])),
        "utterances": changed_utterances(inp.candidate, inp.production, inp.top_utts),
        "leaderboard": _leaderboard(inp.leaderboard, inp.leaderboard_rows),
        "selection": inp.search_selection,
        "history": inp.history or [],
        "epochs": [r for r in (inp.history or []) if is_number(r.get("epoch"))],
        "notes": inp.notes,
        "held_out": list(meta.get("held_out_speakers") or []) + list(meta.get("held_out_voices") or []),
        "utt_boot": d.get("bootstrap_utterance") or {},
        "detect": d.get("detectability"),
        "calibration": calibration_lines(d.get("calibration")),
        "verdict_counts": _verdict_counts(d.get("groups", [])),
    }


def _verdict_counts(groups: Sequence[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in groups:
        if g.get("verdict"):
            out[g["verdict"]] = out.get(g["verdict"], 0) + 1
    return out


SCENARIOS = {
    "copy": "a copy of production (retrained: the noise of retraining)",
    "better_2pts": "uniformly 2 points better",
    "worse_10pts_one_speaker": "10 points worse on one speaker",
    "worse_1pt": "1 point worse overall",
}


def calibration_lines(cal: dict[str, Any] | None) -> dict[str, Any]:
    """What the footer says about the gate's calibration for this golden version."""
    if not cal or cal.get("status") != "calibrated":
        reason = (cal or {}).get("reason", "no calibration was read")
        return {"calibrated": False, "text": f"not calibrated for this golden version ({reason})", "rows": []}
    entry = cal["entry"]
    rows = []
    for key, title in SCENARIOS.items():
        rates = (entry.get("pass_rates") or {}).get(key) or {}
        rows.append({"title": title, "non_regression": _rate(rates.get("non-regression")),
                     "improve": _rate(rates.get("improve"))})
    text = (f"golden {entry.get('golden_version')}, {entry.get('replicates')} synthetic candidates per case, "
            f"measured {entry.get('measured_at')} by {entry.get('command', 'tests/benchmarks/bench_gate.py')}")
    pair = entry.get("retrain_pair") or {}
    if is_number(pair.get("se_blockwise")):
        text += (f"; between its two retrained models ΔWER had a standard error of {100 * pair['se_blockwise']:.2f} pts "
                 f"(blockwise; {100 * pair.get('se_utterance', float('nan')):.2f} utterance-level)")
    if not cal.get("config_matches"):
        text += "; measured with other gate settings than this run's (see the calibration file)"
    return {"calibrated": True, "text": text, "rows": rows}


def _rate(x: Any) -> str:
    return f"{100 * x:.0f} %" if is_number(x) else "n/a"


def group_verdict(g: dict[str, Any]) -> str:
    """The verdict cell: ``regression``, ``no evidence of regression``, ``too small to tell (detects >= x pts)``."""
    verdict = g.get("verdict") or ""
    if verdict == "too small to tell":
        mde = g.get("mde")
        return f"too small to tell (detects ≥ {100 * mde:.1f} pts)" if is_number(mde) else "too small to tell"
    if verdict == "missing":
        return f"FAIL: {g.get('note') or 'missing'}"
    if verdict == "not compared" or not verdict:
        return g.get("note") or "—"
    return verdict


def _fmt(v: Any) -> str:
    if is_number(v):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _fixed(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if is_number(v) else "n/a"


def rule_value(rule: dict[str, Any], key: str = "value") -> str:
    v = rule.get(key)
    name = rule["name"]
    if name == "rtf_budget":
        return _fixed(v, 4)
    if name == "coverage":
        return "n/a" if not is_number(v) else f"{int(v)} missing"
    if name == "finite_outputs":
        return "n/a" if not is_number(v) else f"{int(v)} utts with NaN/Inf"
    if name in ("delta_wer", "worst_group"):
        return format_points(v)
    return format_pct(v)


def _group_ci(g: dict[str, Any]) -> str:
    if not is_number(g.get("ci_high")) or not is_number(g.get("ci_low")):
        return "—"
    conf = f" ({100 * g['confidence']:.2f}%)" if is_number(g.get("confidence")) else ""
    return f"[{format_points(g['ci_low'])}, {format_points(g['ci_high'])}]{conf}"


def _mde(v: Any) -> str:
    return f"≥ {100 * v:.1f} pts" if is_number(v) else "n/a"


def verdict(decision: dict[str, Any]) -> tuple[str, str]:
    """(headline, css class)."""
    if decision.get("forced"):
        return ("GATE FORCED — PASS BY HAND" if not decision.get("rules_passed") else "GATE PASSED (forced)"), "forced"
    if decision.get("passed"):
        return ("GATE PASSED — COLD START" if decision.get("cold_start") else "GATE PASSED"), "pass"
    return ("GATE FAILED — COLD START" if decision.get("cold_start") else "GATE FAILED"), "fail"


def changed_utterances(candidate: Sequence[UttScore], production: Sequence[UttScore] | None, top: int) -> list[dict[str, Any]]:
    """The utterances whose error count changed most (worse first on ties), or the candidate's worst on a cold start."""
    if production is None:
        ranked = sorted(candidate, key=lambda u: (-u.errors, u.utt_id))[:top]
        return [{"utt": u, "prod": None, "change": None} for u in ranked if u.errors > 0]
    by_id = {u.utt_id: u for u in candidate}
    rows = []
    for p in production:
        c = by_id.get(p.utt_id)
        if c is not None and c.errors != p.errors:
            rows.append({"utt": c, "prod": p, "change": c.errors - p.errors})
    rows.sort(key=lambda r: (-abs(r["change"]), -r["change"], r["utt"].utt_id))
    return rows[:top]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def word_diff_html(reference: str, hypothesis: str) -> str:
    """The hypothesis with substituted/inserted words marked and deleted reference words struck through."""
    ref, hyp = reference.split(), hypothesis.split()
    if not hyp:
        return " ".join(['<span class="empty">(empty)</span>'] + [f"<del>{_e(w)}</del>" for w in ref])
    out: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_opcodes():
        if op == "equal":
            out.extend(_e(w) for w in hyp[j1:j2])
        else:
            out.extend(f'<span class="err">{_e(w)}</span>' for w in hyp[j1:j2])
            if op in ("delete", "replace") and i2 - i1 > j2 - j1:
                out.extend(f'<del>{_e(w)}</del>' for w in ref[i1 + (j2 - j1):i2])
    return " ".join(out)


def _leaderboard_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Scalar columns only (curves and lists stay in leaderboard.json), preferred ones first, at most 8."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and k != "config" and not isinstance(v, (list, dict)):
                keys.append(k)
    keys = [k for k in keys if not any(isinstance(r.get(k), (list, dict)) for r in rows)]
    ordered = [k for k in _PREFERRED_LEADERBOARD if k in keys]
    return ordered + [k for k in keys if k not in ordered][: max(0, 8 - len(ordered))]


def _config_text(cfg: Any) -> str:
    if isinstance(cfg, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in cfg.items())
    return "" if cfg is None else json.dumps(cfg)


def _leaderboard(board: Any, n: int) -> dict[str, Any] | None:
    """The head of the search leaderboard as text cells; ``None`` when there is none."""
    if not isinstance(board, list) or not board:
        return None
    rows = [r for r in board if isinstance(r, dict)][:n]
    cols = _leaderboard_columns(rows)
    return {
        "columns": cols,
        "total": len(board),
        "rows": [{"cells": [_leaderboard_cell(r.get(c), c) for c in cols], "config": _config_text(r.get("config"))}
                 for r in rows],
    }


def _leaderboard_cell(v: Any, column: str) -> dict[str, Any]:
    return {"text": format_pct(v) if "wer" in column and is_number(v) else _fmt(v), "numeric": is_number(v)}


def _md(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


class _Missing(jinja2.Undefined):
    """A field the decision lacks reads ``None`` in the report (as ``str(None)``), never an error."""

    def __str__(self) -> str:
        return "None"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The templates beside this module; HTML is autoescaped, Markdown is not."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=False),
        undefined=_Missing,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update({
        "pct": format_pct,
        "pts": format_points,
        "fmt": _fmt,
        "fixed": _fixed,
        "rule_value": rule_value,
        "rule_title": lambda name: RULE_TITLES.get(name, ""),
        "group_ci": _group_ci,
        "verdict": group_verdict,
        "mde": _mde,
        "word_diff": lambda u: word_diff_html(u.reference, u.hypothesis),  # HTML: shown with |safe
        "md": _md,
    })
    return env
