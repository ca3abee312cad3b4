"""The on-call gating report: one self-contained HTML file (inline CSS and SVG) plus Markdown.

Written by the gate stage to ``runs/{run_id}/gate/report.html`` and ``report.md``. Top to
bottom: the decision in big letters with the failing rules and what to do next, the rule
table, per-group WER (candidate vs production), the ΔWER bootstrap distribution, the
utterances whose errors changed most (reference and both hypotheses), the head of the
search leaderboard and the training curves. The pages are the Jinja2 templates in
``templates/`` (``report.html.j2`` with its style sheet ``report.css.j2``, and
``report.md.j2``); this module computes what they show. Charts are drawn with
matplotlib's object-oriented API (no pyplot, no global backend) as inline SVG: the file
opens offline.
"""

from __future__ import annotations

import difflib
import functools
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from pipeline.asr.metrics import UttScore, format_pct, format_points

MAX_GROUPS_IN_CHART = 40
_PREFERRED_LEADERBOARD = ("trial_id", "status", "best_dev_wer", "last_dev_wer", "epochs", "metric", "best_metric",
                         "stop_reason")
RULE_TITLES = {
    "finite_outputs": "No NaN/Inf in the candidate's outputs",
    "wer_ceiling": "Candidate WER under the ceiling",
    "rtf_budget": "Real-time factor within budget",
    "group_wer_ceiling": "Every group's WER under the ceiling",
    "coverage": "Scored on the whole golden set",
    "delta_wer": "ΔWER vs production (CI upper bound)",
    "worst_group": "Worst group ΔWER (CI upper bound)",
}


@dataclass
class ReportInputs:
    decision: dict[str, Any]
    candidate: Sequence[UttScore]
    production: Sequence[UttScore] | None
    bootstrap_samples: Sequence[float] = ()
    leaderboard: list[dict[str, Any]] | None = None
    history: list[dict[str, Any]] | None = None
    top_utts: int = 15
    leaderboard_rows: int = 10
    notes: list[str] = field(default_factory=list)


def render_html(inp: ReportInputs) -> str:
    """The report as one self-contained HTML page."""
    ctx = _context(inp)
    ctx["charts"] = {
        "groups": group_chart(inp.decision.get("groups", [])),
        "bootstrap": bootstrap_chart(inp.bootstrap_samples, inp.decision),
        "training": training_chart(ctx["history"]),
    }
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
        "history": inp.history or [],
        "epochs": [r for r in (inp.history or []) if is_number(r.get("epoch"))],
        "notes": inp.notes,
        "held_out": list(meta.get("held_out_speakers") or []) + list(meta.get("held_out_voices") or []),
    }


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    return f"[{format_points(g['ci_low'])}, {format_points(g['ci_high'])}]" if is_number(g.get("ci_high")) else "—"


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
        "word_diff": lambda u: word_diff_html(u.reference, u.hypothesis),  # HTML: shown with |safe
        "md": _md,
    })
    return env


# --------------------------------------------------------------------------- charts (inline SVG)


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    fig.patch.set_facecolor("white")
    return fig


def group_chart(groups: Sequence[dict[str, Any]]) -> str | None:
    shown = [g for g in groups if is_number(g.get("candidate_wer"))]
    if not shown:
        return None
    checked = sorted([g for g in shown if g.get("checked")], key=lambda g: -(g["delta"] if is_number(g.get("delta")) else -1))
    rest = [g for g in shown if not g.get("checked")]
    shown = (checked + rest)[:MAX_GROUPS_IN_CHART]
    shown = list(reversed(shown))  # barh draws bottom-up
    has_prod = any(is_number(g.get("production_wer")) for g in shown)
    n = len(shown)
    fig = _figure(8.5, 0.42 * n + 1.1)
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(n))
    h = 0.38 if has_prod else 0.6
    cand = [100 * g["candidate_wer"] for g in shown]
    if has_prod:
        prod = [100 * g["production_wer"] if is_number(g.get("production_wer")) else 0 for g in shown]
        ax.barh([i + h / 2 for i in y], prod, height=h, color="#9aa5b1", label="production")
        ax.barh([i - h / 2 for i in y], cand, height=h, color="#2563eb", label="candidate")
    else:
        ax.barh(y, cand, height=h, color="#2563eb", label="candidate")
    top = max(cand + ([100 * g["production_wer"] for g in shown if is_number(g.get("production_wer"))] if has_prod else []))
    for i, g in enumerate(shown):
        x = 100 * g["candidate_wer"]
        ax.text(x + top * 0.01, i - (h / 2 if has_prod else 0), f"{x:.1f}%", va="center", fontsize=8, color="#1e3a8a")
    labels = []
    for g in shown:
        mark = " ✗" if g.get("passed") is False else ""
        labels.append(f"{g['key']} (n={g['n_utts']}){mark}")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    for tick, g in zip(ax.get_yticklabels(), shown):
        if g.get("passed") is False:
            tick.set_color("#b91c1c")
            tick.set_fontweight("bold")
    ax.set_xlabel("WER (%)")
    ax.set_xlim(0, top * 1.15 if top > 0 else 1)
    ax.grid(axis="x", color="#e5e7eb")
    ax.set_axisbelow(True)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return _svg(fig)


def bootstrap_chart(samples: Sequence[float], decision: dict[str, Any]) -> str | None:
    boot = decision.get("bootstrap") or {}
    rule = next((r for r in decision.get("rules", []) if r["name"] == "delta_wer"), None)
    vals = [100 * s for s in samples if is_number(s)]
    if not vals or rule is None:
        return None
    fig = _figure(8.5, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(vals, bins=min(60, max(10, len(set(vals)))), color="#93c5fd", edgecolor="#60a5fa")
    thr = 100 * rule["threshold"]
    lo, hi = min(vals + [thr, 0.0]), max(vals + [thr, 0.0])
    pad = (hi - lo) * 0.08 or 0.5
    ax.axvspan(lo - pad, thr, color="#dcfce7", zorder=0, label=f"pass region (upper ≤ {thr:+.2f})")
    ax.axvline(0, color="#374151", lw=1)
    ax.axvline(thr, color="#b91c1c", lw=1.5, ls="--", label=f"threshold {thr:+.2f} pts")
    if is_number(boot.get("ci_low")) and is_number(boot.get("ci_high")):
        ax.axvline(100 * boot["ci_low"], color="#1d4ed8", lw=1.2, ls=":")
        conf = 100 * boot.get("confidence", 0.95)
        ax.axvline(100 * boot["ci_high"], color="#1d4ed8", lw=1.5, ls=":",
                   label=f"{conf:.0f}% CI [{100 * boot['ci_low']:+.2f}, {100 * boot['ci_high']:+.2f}]")
    if is_number(boot.get("delta")):
        ax.axvline(100 * boot["delta"], color="#1d4ed8", lw=2, label=f"ΔWER {100 * boot['delta']:+.2f} pts")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("ΔWER = candidate − production (percentage points; negative = candidate better)")
    ax.set_ylabel("resamples")
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig)


def training_chart(history: Sequence[dict[str, Any]]) -> str | None:
    rows = [r for r in history if is_number(r.get("epoch"))]
    if not rows:
        return None
    fig = _figure(8.5, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [r["epoch"] for r in rows]
    drew = False
    if any(is_number(r.get("train_loss")) for r in rows):
        ax.plot(epochs, [r.get("train_loss") if is_number(r.get("train_loss")) else float("nan") for r in rows],
                color="#6b7280", marker="o", ms=3, label="train loss")
        ax.set_ylabel("train loss")
        drew = True
    ax2 = ax.twinx()
    if any(is_number(r.get("dev_wer")) for r in rows):
        ax2.plot(epochs, [100 * r["dev_wer"] if is_number(r.get("dev_wer")) else float("nan") for r in rows],
                 color="#2563eb", marker="o", ms=3, label="dev WER (%)")
        ax2.set_ylabel("dev WER (%)", color="#2563eb")
        drew = True
    if not drew:
        return None
    ax.set_xlabel("epoch")
    ax.grid(color="#e5e7eb")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, frameon=False, loc="upper right")
    return _svg(fig)
