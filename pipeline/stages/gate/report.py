"""The on-call gating report: one self-contained HTML file (inline CSS and SVG) plus Markdown.

Written by the gate stage to ``runs/{run_id}/gate/report.html`` and ``report.md``. Top to
bottom: the decision in big letters with the failing rules and what to do next, the rule
table, per-group WER (candidate vs production), the ΔWER bootstrap distribution, the
utterances whose errors changed most (reference and both hypotheses), the head of the
search leaderboard and the training curves. Charts are drawn with matplotlib's
object-oriented API (no pyplot, no global backend) as inline SVG: the file opens offline.
"""

from __future__ import annotations

import difflib
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.asr.metrics import UttScore

MAX_GROUPS_IN_CHART = 40
_PREFERRED_LEADERBOARD = ("trial_id", "status", "best_dev_wer", "last_dev_wer", "epochs", "metric", "best_metric",
                         "stop_reason")


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


# --------------------------------------------------------------------------- formatting


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def pct(x: Any) -> str:
    return "n/a" if not _num(x) else f"{100 * x:.2f}%"


def pts(x: Any) -> str:
    return "n/a" if not _num(x) else f"{100 * x:+.2f} pts"


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def rule_value(rule: dict[str, Any], key: str = "value") -> str:
    v = rule.get(key)
    name = rule["name"]
    if name == "rtf_budget":
        return "n/a" if not _num(v) else f"{v:.4f}"
    if name == "coverage":
        return "n/a" if not _num(v) else f"{int(v)} missing"
    if name == "finite_outputs":
        return "n/a" if not _num(v) else f"{int(v)} utts with NaN/Inf"
    if name in ("delta_wer", "worst_group"):
        return pts(v)
    return pct(v)


RULE_TITLES = {
    "finite_outputs": "No NaN/Inf in the candidate's outputs",
    "wer_ceiling": "Candidate WER under the ceiling",
    "rtf_budget": "Real-time factor within budget",
    "group_wer_ceiling": "Every group's WER under the ceiling",
    "coverage": "Scored on the whole golden set",
    "delta_wer": "ΔWER vs production (CI upper bound)",
    "worst_group": "Worst group ΔWER (CI upper bound)",
}


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
    shown = [g for g in groups if _num(g.get("candidate_wer"))]
    if not shown:
        return None
    checked = sorted([g for g in shown if g.get("checked")], key=lambda g: -(g["delta"] if _num(g.get("delta")) else -1))
    rest = [g for g in shown if not g.get("checked")]
    shown = (checked + rest)[:MAX_GROUPS_IN_CHART]
    shown = list(reversed(shown))  # barh draws bottom-up
    has_prod = any(_num(g.get("production_wer")) for g in shown)
    n = len(shown)
    fig = _figure(8.5, 0.42 * n + 1.1)
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(n))
    h = 0.38 if has_prod else 0.6
    cand = [100 * g["candidate_wer"] for g in shown]
    if has_prod:
        prod = [100 * g["production_wer"] if _num(g.get("production_wer")) else 0 for g in shown]
        ax.barh([i + h / 2 for i in y], prod, height=h, color="#9aa5b1", label="production")
        ax.barh([i - h / 2 for i in y], cand, height=h, color="#2563eb", label="candidate")
    else:
        ax.barh(y, cand, height=h, color="#2563eb", label="candidate")
    top = max(cand + ([100 * g["production_wer"] for g in shown if _num(g.get("production_wer"))] if has_prod else []))
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
    vals = [100 * s for s in samples if _num(s)]
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
    if _num(boot.get("ci_low")) and _num(boot.get("ci_high")):
        ax.axvline(100 * boot["ci_low"], color="#1d4ed8", lw=1.2, ls=":")
        conf = 100 * boot.get("confidence", 0.95)
        ax.axvline(100 * boot["ci_high"], color="#1d4ed8", lw=1.5, ls=":",
                   label=f"{conf:.0f}% CI [{100 * boot['ci_low']:+.2f}, {100 * boot['ci_high']:+.2f}]")
    if _num(boot.get("delta")):
        ax.axvline(100 * boot["delta"], color="#1d4ed8", lw=2, label=f"ΔWER {100 * boot['delta']:+.2f} pts")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("ΔWER = candidate − production (percentage points; negative = candidate better)")
    ax.set_ylabel("resamples")
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig)


def training_chart(history: Sequence[dict[str, Any]]) -> str | None:
    rows = [r for r in history if _num(r.get("epoch"))]
    if not rows:
        return None
    fig = _figure(8.5, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [r["epoch"] for r in rows]
    drew = False
    if any(_num(r.get("train_loss")) for r in rows):
        ax.plot(epochs, [r.get("train_loss") if _num(r.get("train_loss")) else float("nan") for r in rows],
                color="#6b7280", marker="o", ms=3, label="train loss")
        ax.set_ylabel("train loss")
        drew = True
    ax2 = ax.twinx()
    if any(_num(r.get("dev_wer")) for r in rows):
        ax2.plot(epochs, [100 * r["dev_wer"] if _num(r.get("dev_wer")) else float("nan") for r in rows],
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


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif;margin:0;background:#f3f4f6;color:#111827}
main{max-width:1120px;margin:0 auto;padding:20px 24px 60px}
h2{margin:34px 0 10px;font-size:20px;border-bottom:2px solid #e5e7eb;padding-bottom:4px}
.banner{border-radius:10px;padding:22px 26px;color:#fff;margin-bottom:16px}
.banner.pass{background:#15803d}.banner.fail{background:#b91c1c}.banner.forced{background:#c2410c}
.banner h1{font-size:46px;margin:0 0 6px;letter-spacing:1px}
.banner .sub{font-size:15px;opacity:.95}
.banner ul{margin:12px 0 0;padding-left:22px;font-size:16px}
.banner li{margin:4px 0}
.kpis{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.kpi{background:#fff;border-radius:8px;padding:12px 16px;flex:1 1 0;min-width:130px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.kpi .v{font-size:26px;font-weight:700}.kpi .l{font-size:12px;color:#4b5563;text-transform:uppercase;letter-spacing:.5px}
.callout{border-radius:8px;padding:12px 16px;margin:10px 0;border-left:6px solid}
.callout.cold{background:#fef9c3;border-color:#ca8a04}.callout.force{background:#ffedd5;border-color:#c2410c}
.callout.next{background:#e0f2fe;border-color:#0284c7}.callout.note{background:#f3f4f6;border-color:#6b7280}
code{background:#e5e7eb;border-radius:4px;padding:1px 5px;font-size:13px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{padding:7px 10px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
th{background:#f9fafb;font-size:12px;text-transform:uppercase;letter-spacing:.4px;color:#374151}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.res{white-space:nowrap}
.ok{color:#15803d;font-weight:700}.bad{color:#b91c1c;font-weight:700}.muted{color:#6b7280}
tr.failrow{background:#fef2f2}
.err{background:#fecaca;border-radius:3px;padding:0 2px}
del{color:#b91c1c}
.empty{color:#9ca3af;font-style:italic}
.chart{background:#fff;border-radius:8px;padding:8px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.chart svg{max-width:100%;height:auto;display:block;margin:0 auto}
.small{font-size:12px;color:#4b5563}
footer{margin-top:40px;font-size:12px;color:#4b5563}
"""


def _ok(passed: Any) -> str:
    if passed is None:
        return '<span class="muted">—</span>'
    return '<span class="ok">✔ pass</span>' if passed else '<span class="bad">✘ FAIL</span>'


def _next_steps(d: dict[str, Any]) -> str:
    run = _e(d.get("run_id"))
    if d.get("passed"):
        forced = " (forced)" if d.get("forced") else ""
        return (
            f"<b>Next:</b> the candidate{forced} is registered as alias <code>challenger</code> by the register stage, "
            "then canaried; <code>production</code> moves only after a healthy canary or "
            "<code>asr-retune promote --version V --reason '...'</code>. "
            "Undo a promotion with <code>asr-retune rollback --reason '...'</code>; "
            "list every move with <code>asr-retune history</code>."
        )
    return (
        "<b>Next:</b> nothing is registered and production is unchanged. Read the failing rules above and the "
        "group table below. Overriding is a manual, recorded decision: "
        f"<code>asr-retune gate --run-id {run} --force-reason '...'</code>."
    )


def render_html(inp: ReportInputs) -> str:
    d = inp.decision
    head, cls = verdict(d)
    prod = d.get("production")
    cand = d.get("candidate") or {}
    golden = d.get("golden") or {}
    rules = d.get("rules", [])
    failing = [r for r in rules if not r["passed"]]
    parts: list[str] = []
    sub = (f"run <b>{_e(d.get('run_id'))}</b> · candidate vs "
           + (f"production <b>{_e(prod['model_uri'])}</b>" if prod else "<b>no production model (cold start)</b>")
           + f" · golden set <b>{_e(golden.get('version'))}</b> ({_e(golden.get('n_utts'))} utterances)"
           + f" · mode <b>{_e(d.get('mode'))}</b> · decided {_e(d.get('decided_at'))}")
    parts.append(f'<section class="banner {cls}"><h1>{_e(head)}</h1><div class="sub">{sub}</div>')
    if failing:
        title = "Failing rules (overridden by hand):" if d.get("forced") else "Failing rules:"
        items = "".join(f"<li><b>{_e(r['name'])}</b> — {_e(r['detail'])}</li>" for r in failing)
        parts.append(f'<div style="margin-top:12px;font-size:16px"><b>{title}</b></div><ul>{items}</ul>')
    elif d.get("passed"):
        parts.append('<ul><li>every rule passed</li></ul>')
    parts.append("</section>")

    boot = d.get("bootstrap") or {}
    kpis = [(pct(cand.get("wer")), "candidate WER")]
    if prod:
        kpis.append((pct(prod.get("wer")), f"production WER (version {prod.get('version')})"))
        kpis.append((pts(boot.get("delta")), "ΔWER (cand − prod)"))
        kpis.append((f"[{pts(boot.get('ci_low'))}, {pts(boot.get('ci_high'))}]".replace(" pts", ""),
                     f"{100 * boot.get('confidence', 0.95):.0f}% CI (pts)"))
    kpis.append((f"{cand.get('rtf'):.3f}" if _num(cand.get("rtf")) else "n/a", "candidate RTF"))
    parts.append('<div class="kpis">' + "".join(
        f'<div class="kpi"><div class="v">{_e(v)}</div><div class="l">{_e(lbl)}</div></div>' for v, lbl in kpis) + "</div>")

    if d.get("cold_start"):
        parts.append('<div class="callout cold"><b>Cold start:</b> there is no production model to compare with, so '
                     "only the <b>absolute rules</b> were applied (WER ceiling, RTF budget"
                     + (", group WER ceiling" if any(r["name"] == "group_wer_ceiling" for r in rules) else "")
                     + "). The relative rules (ΔWER, worst group, coverage) were <b>not evaluated</b>.</div>")
    if d.get("forced"):
        parts.append(f'<div class="callout force"><b>Forced by {_e(d.get("forced_by"))}</b> with the reason: '
                     f'“{_e(d.get("force_reason"))}”. The rules below show what the gate decided on its own '
                     f'({"pass" if d.get("rules_passed") else "fail"}). This override is recorded in the decision and '
                     "in the registry.</div>")
    parts.append(f'<div class="callout next">{_next_steps(d)}</div>')
    for note in inp.notes:
        parts.append(f'<div class="callout note">{_e(note)}</div>')

    # rules
    parts.append("<h2>Rules</h2><table><tr><th>rule</th><th>kind</th><th>value</th><th>threshold (≤)</th>"
                 "<th>result</th><th>detail</th></tr>")
    for r in rules:
        parts.append(
            f'<tr class="{"" if r["passed"] else "failrow"}"><td><b>{_e(r["name"])}</b><br>'
            f'<span class="small">{_e(RULE_TITLES.get(r["name"], ""))}</span></td><td>{_e(r["kind"])}</td>'
            f'<td class="num">{_e(rule_value(r))}</td><td class="num">{_e(rule_value(r, "threshold"))}</td>'
            f'<td class="res">{_ok(r["passed"])}</td><td>{_e(r["detail"])}</td></tr>'
        )
    for s in d.get("skipped_rules", []):
        parts.append(f'<tr><td><b>{_e(s["name"])}</b></td><td>relative</td><td class="num">—</td><td class="num">—</td>'
                     f'<td><span class="muted">not evaluated</span></td><td>{_e(s["reason"])}</td></tr>')
    parts.append("</table>")

    # groups
    groups = d.get("groups", [])
    parts.append("<h2>WER per group: candidate vs production</h2>")
    parts.append('<p class="small">Speakers (<code>speaker:</code>), accent groups (<code>group:</code>) and speakers seen '
                 "in training vs never seen (<code>cohort:</code>). Groups with fewer than "
                 f"{_e(d.get('config', {}).get('min_group_utts'))} utterances are shown but not checked. "
                 "Failing groups are red and marked ✗.</p>")
    chart = group_chart(groups)
    if chart:
        parts.append(f'<div class="chart">{chart}</div>')
    parts.append('<table style="margin-top:10px"><tr><th>group</th><th>utts</th><th>words</th><th>production</th>'
                 "<th>candidate</th><th>ΔWER</th><th>CI</th><th>result</th></tr>")
    for g in sorted(groups, key=lambda g: (g["kind"] != "cohort", g["kind"], g["key"])):
        ci = f"[{pts(g['ci_low'])}, {pts(g['ci_high'])}]" if _num(g.get("ci_high")) else "—"
        res = _ok(g["passed"]) if g.get("checked") else f'<span class="muted">{_e(g.get("note") or "—")}</span>'
        if g.get("checked") and g.get("note"):
            res += f'<br><span class="small">{_e(g["note"])}</span>'
        parts.append(
            f'<tr class="{"failrow" if g.get("passed") is False else ""}"><td>{_e(g["key"])}</td>'
            f'<td class="num">{g["n_utts"]}</td><td class="num">{g["n_words"]}</td>'
            f'<td class="num">{pct(g.get("production_wer"))}</td><td class="num">{pct(g.get("candidate_wer"))}</td>'
            f'<td class="num">{pts(g.get("delta"))}</td><td class="num">{_e(ci)}</td><td>{res}</td></tr>'
        )
    parts.append("</table>")

    # bootstrap
    parts.append("<h2>ΔWER bootstrap distribution</h2>")
    chart = bootstrap_chart(inp.bootstrap_samples, d)
    if chart:
        parts.append(f'<p class="small">{_e(boot.get("n_resamples"))} paired resamples of the golden-set utterances '
                     f"(seed {_e(boot.get('seed'))}): the same draw is scored for both models. The gate looks at the "
                     "upper bound of the interval: it must lie in the green region.</p>")
        parts.append(f'<div class="chart">{chart}</div>')
    else:
        parts.append('<p class="muted">Not computed (cold start: no production model).</p>')

    # utterances
    rows = changed_utterances(inp.candidate, inp.production, inp.top_utts)
    if inp.production is not None:
        parts.append(f"<h2>Utterances whose errors changed most (top {len(rows)})</h2>")
        parts.append('<p class="small">Word errors per utterance; positive change = the candidate is worse. '
                     '<span class="err">marked</span> words are substitutions or insertions, <del>struck</del> '
                     "words were deleted.</p>")
        parts.append("<table><tr><th>utterance</th><th>change</th><th>reference</th><th>production</th>"
                     "<th>candidate</th></tr>")
        for r in rows:
            u, p = r["utt"], r["prod"]
            cls_ = "bad" if r["change"] > 0 else "ok"
            parts.append(
                f'<tr><td>{_e(u.utt_id)}<br><span class="small">{_e(u.speaker)} · {_e(u.group)}</span></td>'
                f'<td class="num"><span class="{cls_}">{r["change"]:+d}</span><br>'
                f'<span class="small">{p.errors}→{u.errors} / {u.ref_words}</span></td>'
                f"<td>{_e(u.reference)}</td><td>{word_diff_html(p.reference, p.hypothesis)}</td>"
                f"<td>{word_diff_html(u.reference, u.hypothesis)}</td></tr>"
            )
        if not rows:
            parts.append('<tr><td colspan="5" class="muted">no utterance changed its error count</td></tr>')
        parts.append("</table>")
    else:
        parts.append(f"<h2>Candidate's worst utterances (top {len(rows)})</h2><table><tr><th>utterance</th>"
                     "<th>errors</th><th>reference</th><th>candidate</th></tr>")
        for r in rows:
            u = r["utt"]
            parts.append(f'<tr><td>{_e(u.utt_id)}<br><span class="small">{_e(u.speaker)} · {_e(u.group)}</span></td>'
                         f'<td class="num">{u.errors} / {u.ref_words}</td><td>{_e(u.reference)}</td>'
                         f"<td>{word_diff_html(u.reference, u.hypothesis)}</td></tr>")
        parts.append("</table>")

    # leaderboard
    parts.append("<h2>Search leaderboard (head)</h2>")
    parts.append(_leaderboard_html(inp.leaderboard, inp.leaderboard_rows))

    # training curves
    parts.append("<h2>Training curves</h2>")
    chart = training_chart(inp.history or [])
    if chart:
        last = (inp.history or [])[-1]
        parts.append(f'<p class="small">{len(inp.history or [])} epochs; last: train loss '
                     f'{_e(_fmt(last.get("train_loss")))}, dev WER {pct(last.get("dev_wer"))}.</p>')
        parts.append(f'<div class="chart">{chart}</div>')
    else:
        parts.append('<p class="muted">No training history for this run (runs/&lt;run&gt;/train/history.json).</p>')

    parts.append(_footer(d))
    body = "\n".join(parts)
    title = f"{head} — asr-retune gate, run {d.get('run_id')}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>\n{body}\n</main></body></html>\n")


def _fmt(v: Any) -> str:
    if _num(v):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


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


def _leaderboard_html(board: Any, n: int) -> str:
    if not isinstance(board, list) or not board:
        return '<p class="muted">No search leaderboard for this run (runs/&lt;run&gt;/search/leaderboard.json).</p>'
    rows = [r for r in board if isinstance(r, dict)][:n]
    cols = _leaderboard_columns(rows)
    out = [f'<p class="small">First {len(rows)} of {len(board)} trials.</p><table><tr><th>#</th>'
           + "".join(f"<th>{_e(c)}</th>" for c in cols) + "<th>config</th></tr>"]
    for i, r in enumerate(rows, 1):
        cells = "".join(
            f'<td class="{"num" if _num(r.get(c)) else ""}">'
            f'{_e(pct(r.get(c)) if "wer" in c and _num(r.get(c)) else _fmt(r.get(c)))}</td>'
            for c in cols
        )
        out.append(f'<tr><td class="num">{i}</td>{cells}<td class="small">{_e(_config_text(r.get("config")))}</td></tr>')
    out.append("</table>")
    return "".join(out)


def _footer(d: dict[str, Any]) -> str:
    cand = d.get("candidate") or {}
    golden = d.get("golden") or {}
    meta = golden.get("meta") or {}
    lines = [
        f"decision: {_e(d.get('decision_uri'))}",
        f"candidate: {_e(cand.get('uri'))} (sha256 {_e(str(cand.get('sha256'))[:16])}…)",
        f"golden set: {_e(golden.get('manifest_uri'))}",
    ]
    if meta.get("held_out_speakers") or meta.get("held_out_voices"):
        lines.append("never-seen speakers/voices in the golden set: "
                     + _e(", ".join(list(meta.get("held_out_speakers") or []) + list(meta.get("held_out_voices") or []))))
    cfg = d.get("config") or {}
    lines.append("gate config: " + _e(", ".join(f"{k}={v}" for k, v in cfg.items())))
    return "<footer>" + "<br>".join(lines) + "</footer>"


# --------------------------------------------------------------------------- Markdown


def _md(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(inp: ReportInputs) -> str:
    d = inp.decision
    head, _ = verdict(d)
    mark = "✅" if d.get("passed") and not d.get("forced") else ("⚠️" if d.get("forced") else "❌")
    prod = d.get("production")
    cand = d.get("candidate") or {}
    golden = d.get("golden") or {}
    boot = d.get("bootstrap") or {}
    out = [f"# {mark} {head}", ""]
    out.append(f"Run `{d.get('run_id')}` · candidate vs "
               + (f"production `{prod['model_uri']}`" if prod else "**no production model (cold start)**")
               + f" · golden set `{golden.get('version')}` ({golden.get('n_utts')} utterances) · mode `{d.get('mode')}`"
               + f" · decided {d.get('decided_at')}")
    out.append("")
    failing = [r for r in d.get("rules", []) if not r["passed"]]
    if failing:
        out.append("**Failing rules" + (" (overridden by hand)" if d.get("forced") else "") + ":**")
        out.append("")
        out.extend(f"- **{r['name']}** — {r['detail']}" for r in failing)
        out.append("")
    line = f"Candidate WER **{pct(cand.get('wer'))}**"
    if prod:
        line += (f", production (v{prod.get('version')}) **{pct(prod.get('wer'))}**, ΔWER **{pts(boot.get('delta'))}** "
                 f"({100 * boot.get('confidence', 0.95):.0f}% CI [{pts(boot.get('ci_low'))}, {pts(boot.get('ci_high'))}])")
    line += f", RTF {_fmt(cand.get('rtf'))}."
    out += [line, ""]
    if d.get("cold_start"):
        out += ["> **Cold start:** no production model to compare with; only the absolute rules were applied. "
                "The relative rules (ΔWER, worst group, coverage) were not evaluated.", ""]
    if d.get("forced"):
        out += [f"> **Forced by {d.get('forced_by')}:** “{d.get('force_reason')}” (the rules alone said "
                f"{'pass' if d.get('rules_passed') else 'fail'}).", ""]
    out += ["> " + html.unescape(_strip_tags(_next_steps(d))), ""]
    out += [f"> {n}" for n in inp.notes]
    out += ["## Rules", "", "| rule | kind | value | threshold (≤) | result | detail |", "|---|---|---:|---:|---|---|"]
    for r in d.get("rules", []):
        out.append(f"| {r['name']} | {r['kind']} | {rule_value(r)} | {rule_value(r, 'threshold')} | "
                   f"{'pass' if r['passed'] else '**FAIL**'} | {_md(r['detail'])} |")
    for s in d.get("skipped_rules", []):
        out.append(f"| {s['name']} | relative | — | — | not evaluated | {_md(s['reason'])} |")
    out += ["", "## WER per group", "", "| group | utts | production | candidate | ΔWER | CI | result |",
            "|---|---:|---:|---:|---:|---|---|"]
    for g in sorted(d.get("groups", []), key=lambda g: (g["kind"] != "cohort", g["kind"], g["key"])):
        ci = f"[{pts(g['ci_low'])}, {pts(g['ci_high'])}]" if _num(g.get("ci_high")) else "—"
        res = ("pass" if g["passed"] else "**FAIL**") if g.get("checked") else (g.get("note") or "—")
        out.append(f"| {_md(g['key'])} | {g['n_utts']} | {pct(g.get('production_wer'))} | {pct(g.get('candidate_wer'))} "
                   f"| {pts(g.get('delta'))} | {ci} | {_md(res)} |")
    rows = changed_utterances(inp.candidate, inp.production, inp.top_utts)
    if inp.production is not None:
        out += ["", "## Utterances whose errors changed most", "",
                "| utterance | change | reference | production | candidate |", "|---|---:|---|---|---|"]
        for r in rows:
            u, p = r["utt"], r["prod"]
            out.append(f"| {_md(u.utt_id)} ({_md(u.speaker)}) | {r['change']:+d} | {_md(u.reference)} | "
                       f"{_md(p.hypothesis) or '(empty)'} | {_md(u.hypothesis) or '(empty)'} |")
    else:
        out += ["", "## Candidate's worst utterances", "", "| utterance | errors | reference | candidate |",
                "|---|---:|---|---|"]
        for r in rows:
            u = r["utt"]
            out.append(f"| {_md(u.utt_id)} ({_md(u.speaker)}) | {u.errors}/{u.ref_words} | {_md(u.reference)} | "
                       f"{_md(u.hypothesis) or '(empty)'} |")
    out += ["", "## Search leaderboard (head)", ""]
    board = inp.leaderboard
    if isinstance(board, list) and board:
        rows_b = [r for r in board if isinstance(r, dict)][: inp.leaderboard_rows]
        cols = _leaderboard_columns(rows_b)
        out.append("| # | " + " | ".join(cols) + " | config |")
        out.append("|---:|" + "---:|" * len(cols) + "---|")
        for i, r in enumerate(rows_b, 1):
            vals = [pct(r.get(c)) if "wer" in c and _num(r.get(c)) else _fmt(r.get(c)) for c in cols]
            out.append(f"| {i} | " + " | ".join(_md(v) for v in vals) + f" | {_md(_config_text(r.get('config')))} |")
    else:
        out.append("No search leaderboard for this run.")
    out += ["", "## Training curves", ""]
    hist = [r for r in (inp.history or []) if _num(r.get("epoch"))]
    if hist:
        out += ["| epoch | train loss | dev WER |", "|---:|---:|---:|"]
        out += [f"| {r['epoch']} | {_fmt(r.get('train_loss'))} | {pct(r.get('dev_wer'))} |" for r in hist]
    else:
        out.append("No training history for this run.")
    out += ["", "---", f"Decision: `{d.get('decision_uri')}` · HTML report with charts: `{d.get('report_uri')}`", ""]
    return "\n".join(out)


def _strip_tags(s: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", s.replace("<code>", "`").replace("</code>", "`"))
