"""The report's charts, as inline SVG (the report opens offline, with no external assets).

* :func:`forest_plot` — the geometry of the forest plot of every compared group's ΔWER and
  its Holm-adjusted interval, coloured by verdict; the SVG itself is drawn by the template
  ``templates/forest.svg.j2``.
* :func:`group_chart`, :func:`bootstrap_chart`, :func:`training_chart` — drawn with
  matplotlib's object-oriented API (no pyplot, no global backend).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

MAX_GROUPS_IN_CHART = 40
KIND_ORDER = {"cohort": 0, "condition": 1, "group": 2, "speaker": 3}
VERDICT_COLORS = {"regression": "#b91c1c", "no evidence of regression": "#15803d", "too small to tell": "#a16207"}


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- forest plot (drawn by the template)


def _nice_ticks(lo: float, hi: float, target: int = 7) -> list[float]:
    span = hi - lo
    raw = span / max(1, target - 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def forest_plot(groups: Sequence[dict[str, Any]], tolerance: float, *, width: int = 900,
                row_height: int = 22) -> dict[str, Any] | None:
    """Rows, axis and reference lines of the forest plot (ΔWER in points; negative = candidate better)."""
    rows = [g for g in groups if is_number(g.get("delta")) and is_number(g.get("ci_low")) and is_number(g.get("ci_high"))]
    if not rows:
        return None
    rows = sorted(rows, key=lambda g: (KIND_ORDER.get(g["kind"], 9), g["key"]))[:MAX_GROUPS_IN_CHART]
    lo = min([100 * g["ci_low"] for g in rows] + [0.0, -100 * tolerance])
    hi = max([100 * g["ci_high"] for g in rows] + [0.0, 100 * tolerance])
    pad = (hi - lo) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    longest = max(len(f"{g['key']} (n={g['n_utts']})") for g in rows)
    left = max(180, min(440, 16 + round(6.8 * longest)))  # room for the labels (12 px sans: ~6.8 px a character)
    width = max(width, left + 560)
    right, top = width - 190, 34
    height = top + row_height * len(rows) + 44

    def x(v: float) -> float:
        return round(left + (v - lo) / (hi - lo) * (right - left), 1)

    out_rows = []
    for i, g in enumerate(rows):
        verdict = g.get("verdict") or ""
        out_rows.append({
            "y": top + row_height * i + row_height / 2, "label": f"{g['key']} (n={g['n_utts']})",
            "x_lo": x(100 * g["ci_low"]), "x_hi": x(100 * g["ci_high"]), "x_mid": x(100 * g["delta"]),
            "color": VERDICT_COLORS.get(verdict, "#6b7280"), "cls": verdict.split(" ")[0] or "none",
            "text": f"{100 * g['delta']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]",
            "verdict": verdict, "confidence": g.get("confidence"),
        })
    ticks = [{"x": x(t), "label": f"{t:+g}" if t else "0"} for t in _nice_ticks(lo, hi)]
    return {"width": width, "height": height, "left": left, "right": right, "top": top,
            "bottom": top + row_height * len(rows), "rows": out_rows, "ticks": ticks, "zero_x": x(0.0),
            "tol_x": x(100 * tolerance), "tolerance": f"{100 * tolerance:+g}", "text_x": right + 10}


# --------------------------------------------------------------------------- matplotlib charts


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
        mark = " ✗" if g.get("passed") is False else (" ?" if g.get("verdict") == "too small to tell" else "")
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


def bootstrap_chart(samples: Sequence[float], decision: dict[str, Any],
                    utterance_samples: Sequence[float] = ()) -> str | None:
    """The blockwise ΔWER bootstrap distribution (the rule's), the utterance-level one as an outline,
    both intervals and what the mode asks of them."""
    boot = decision.get("bootstrap") or {}
    rule = next((r for r in decision.get("rules", []) if r["name"] == "delta_wer"), None)
    vals = [100 * s for s in samples if is_number(s)]
    if not vals or rule is None:
        return None
    utt = [100 * s for s in utterance_samples if is_number(s)]
    fig = _figure(8.5, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    thr = 100 * rule["threshold"]
    lo, hi = min(vals + utt + [thr, 0.0]), max(vals + utt + [thr, 0.0])
    pad = (hi - lo) * 0.08 or 0.5
    bins = min(60, max(10, len(set(vals))))
    ax.hist(vals, bins=bins, color="#93c5fd", edgecolor="#60a5fa", label="blockwise resamples (speakers, then utterances)")
    if utt:
        ax.hist(utt, bins=bins, histtype="step", color="#6b7280", lw=1, label="utterance-level resamples")
    if rule.get("mode") == "non-regression":
        ax.axvspan(lo - pad, thr, color="#dcfce7", zorder=0, label=f"pass region of ΔWER (≤ {thr:+.2f}; lower bound ≤ 0)")
    else:
        ax.axvspan(lo - pad, thr, color="#dcfce7", zorder=0, label=f"pass region of the upper bound (≤ {thr:+.2f})")
    ax.axvline(0, color="#374151", lw=1)
    ax.axvline(thr, color="#b91c1c", lw=1.5, ls="--", label=f"threshold {thr:+.2f} pts")
    if is_number(boot.get("ci_low")) and is_number(boot.get("ci_high")):
        ax.axvline(100 * boot["ci_low"], color="#1d4ed8", lw=1.2, ls=":")
        conf = 100 * boot.get("confidence", 0.95)
        ax.axvline(100 * boot["ci_high"], color="#1d4ed8", lw=1.5, ls=":",
                   label=f"{conf:.0f}% blockwise CI [{100 * boot['ci_low']:+.2f}, {100 * boot['ci_high']:+.2f}]")
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
