"""The on-call report renders in a real headless Chromium (Debian's ``chromium``), offline.

The report is built from synthetic per-utterance scores (a candidate better on average but
much worse for one accent group, so every section has something to show and the groups
get all three verdicts), written as a file and screenshotted; the screenshot must not be
blank, and the forest plot, screenshotted on its own, shows the verdicts' colours.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.asr.metrics import UttScore
from pipeline.config import GateConfig
from pipeline.stages.gate.calibration import manifest_sha256, read_calibration, rule_settings, write_calibration
from pipeline.stages.gate.report import ReportInputs, changed_utterances, render_html, render_markdown, word_diff_html
from pipeline.stages.gate.rules import decide

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DIGITS = "zero one two three four five six seven eight nine".split()
GROUPS = {"USA/neutral": ("jackson",), "DEU/German": ("yweweler", "nicolas"), "BEL/French": ("lucas",),
          "GRC/Greek": ("george",)}


def scored(rates: dict[str, float], seed: int, refs: list[str]) -> list[UttScore]:
    rng = np.random.default_rng(seed)
    out, i = [], 0
    for group, speakers in GROUPS.items():
        for k in range(30):
            ref = refs[i].split()
            hyp = [w if rng.random() > rates[group] else DIGITS[int(rng.integers(10))] for w in ref]
            if rng.random() < rates[group] / 2:
                hyp = hyp[:-1]
            errors = sum(a != b for a, b in zip(ref, hyp)) + len(ref) - len(hyp)
            out.append(UttScore(f"golden-v1-{i:05d}", speakers[k % len(speakers)], group, " ".join(ref), " ".join(hyp),
                                errors, len(ref), errors, len(" ".join(ref))))
            i += 1
    return out


def inputs(cold: bool = False, calibration: dict | None = None) -> ReportInputs:
    rng = np.random.default_rng(0)
    refs = [" ".join(DIGITS[d] for d in rng.integers(0, 10, size=int(rng.integers(2, 7)))) for _ in range(120)]
    prod = scored({"USA/neutral": 0.25, "DEU/German": 0.2, "BEL/French": 0.3, "GRC/Greek": 0.15}, 1, refs)
    cand = scored({"USA/neutral": 0.05, "DEU/German": 0.05, "BEL/French": 0.08, "GRC/Greek": 0.5}, 2, refs)
    cohorts = {u.utt_id: ("unseen" if u.group == "GRC/Greek" else "seen") for u in prod}
    cfg = GateConfig(min_group_utts=20, bootstrap_resamples=1000)
    out = decide(cand, None if cold else prod, candidate_rtf=0.031, cfg=cfg, cohorts=cohorts)
    decision = {
        "run_id": "scheduled__2026-11-23T00:00:00+00:00",
        "decided_at": "2026-11-23T04:12:00+00:00",
        **out.decision,
        "candidate": {"uri": "file:///store/runs/x/train/model.pt", "sha256": "ab" * 32, "wer": 0.17, "rtf": 0.031},
        "production": None if cold else {"model": "asr", "version": "7", "model_uri": "models:/asr/7", "wer": 0.22},
        "golden": {"version": "v1", "n_utts": 120, "manifest_uri": "file:///store/golden/v1/manifest.jsonl",
                   "meta": {"held_out_speakers": ["george"], "held_out_voices": ["espeak-en-gb-scotland+f4"]}},
        "config": cfg.model_dump(mode="json"),
        "calibration": calibration,
        "decision_uri": "file:///store/runs/x/gate/decision.json",
        "report_uri": "file:///store/runs/x/gate/report.html",
    }
    decision["candidate"]["wer"] = sum(u.errors for u in cand) / sum(u.ref_words for u in cand)
    if not cold:
        decision["production"]["wer"] = sum(u.errors for u in prod) / sum(u.ref_words for u in prod)
    board = [{"trial_id": f"t{i:03d}", "trial_number": i, "status": "completed" if i < 3 else "asha_stopped",
              "best_dev_wer": 0.08 + 0.03 * i, "last_dev_wer": 0.09 + 0.03 * i, "epochs": 12 - i,
              "metric": "dev_wer", "best_metric": 0.08 + 0.03 * i, "stop_reason": "completed" if i < 3 else "asha_stopped",
              "curve": [[e, 0.5 / e] for e in range(1, 13 - i)], "resumed_from": [],
              "config": {"encoder": "conformer" if i % 2 else "lstm", "d_model": 144, "lr": 0.003 / (i + 1)}}
             for i in range(14)]  # the shape pipeline.stages.search.stage writes
    history = [{"epoch": e, "train_loss": 2.5 * 0.8 ** e, "dev_wer": 0.6 * 0.82 ** e} for e in range(1, 13)]
    samples = [] if out.bootstrap is None else [float(x) for x in out.bootstrap["samples"]]
    utt = [] if out.utterance_bootstrap is None else [float(x) for x in out.utterance_bootstrap["samples"]]
    return ReportInputs(decision, cand, None if cold else prod, samples, board, history, utterance_samples=utt)


def test_report_sections_and_self_contained():
    inp = inputs()
    html = render_html(inp)
    assert html.index("GATE FAILED") < html.index("<h2>Rules</h2>")  # the decision comes first
    for section in ("Rules", "WER per group", "ΔWER bootstrap distribution", "Utterances whose errors changed most",
                    "Search leaderboard (head)", "Training curves"):
        assert f"<h2>{section}" in html
    assert html.count("<svg") == 4  # forest plot, groups, bootstrap, training curves
    assert "worst_group" in html and "cohort:unseen" in html and "group:GRC/Greek" in html
    # offline: nothing fetched from anywhere
    assert not re.search(r"<(script|link|img|iframe)\b", html)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"url\((?!#)", html)  # only in-document references (SVG clip paths)
    md = render_markdown(inp)
    assert md.startswith("# ❌ GATE FAILED") and "| worst_group | relative |" in md
    assert "## Training curves" in md and "| t000 |" in md
    assert "[[1, 0.5]" not in html and "[[1, 0.5]" not in md  # curves stay in leaderboard.json


def test_group_verdicts_forest_plot_and_detectability():
    inp = inputs()
    html, md = render_html(inp), render_markdown(inp)
    verdicts = {g["key"]: g["verdict"] for g in inp.decision["groups"]}
    assert verdicts["group:GRC/Greek"] == "regression" and verdicts["speaker:george"] == "regression"
    assert verdicts["group:USA/neutral"] == "no evidence of regression"
    assert verdicts["speaker:nicolas"] == "too small to tell"  # 15 utterances < min_group_utts
    forest = re.search(r'<svg class="forest".*?</svg>', html, re.S).group(0)
    assert forest.count('class="row verdict-') == sum(1 for g in inp.decision["groups"] if g.get("ci_low") is not None)
    for cls in ("verdict-regression", "verdict-no", "verdict-too"):
        assert cls in forest
    assert "group tolerance +3" in forest
    assert re.search(r"too small to tell \(detects ≥ \d+\.\d pts\)", html)
    assert "<h2>What this golden set can detect</h2>" in html and "## What this golden set can detect" in md
    assert "utterance-level" in html and "blockwise" in html
    assert "| speaker:george |" in md and "| regression |" in md
    assert "not calibrated for this golden version" in html and "not calibrated for this golden version" in md


def test_footer_quotes_the_calibration_of_the_golden_version(tmp_path):
    cfg = GateConfig(min_group_utts=20, bootstrap_resamples=1000)
    path, manifest = tmp_path / "gate-calibration.json", '{"utt_id": "a"}\n'
    rates = {"copy": {"non-regression": 0.97, "improve": 0.02}, "better_2pts": {"non-regression": 1.0, "improve": 0.91},
             "worse_10pts_one_speaker": {"non-regression": 0.03, "improve": 0.0},
             "worse_1pt": {"non-regression": 0.04, "improve": 0.0}}
    write_calibration(path, "v1", {"golden_version": "v1", "manifest_sha256": manifest_sha256(manifest), "replicates": 400,
                                   "measured_at": "2026-11-20", "gate": rule_settings(cfg), "pass_rates": rates})
    cal = read_calibration(path, "v1", manifest_sha256(manifest), cfg)
    assert cal["status"] == "calibrated" and cal["config_matches"] is True
    html, md = render_html(inputs(calibration=cal)), render_markdown(inputs(calibration=cal))
    footer = html[html.index("<footer>"):]
    assert "400 synthetic candidates" in footer and "97 %" in footer and "91 %" in footer
    assert "| 1 point worse overall | 4 % | 0 % |" in md
    assert read_calibration(path, "v2", manifest_sha256(manifest), cfg)["status"] == "not calibrated"
    other = read_calibration(path, "v1", manifest_sha256("another manifest"), cfg)
    assert other["status"] == "not calibrated" and "another manifest" in other["reason"]


def test_cold_start_report_says_so():
    html = render_html(inputs(cold=True))
    assert "Cold start" in html and "not evaluated" in html and "GATE PASSED" in html
    assert "Candidate&#x27;s worst utterances" in html or "Candidate's worst utterances" in html
    assert "Cold start" in render_markdown(inputs(cold=True))


def test_word_diff_and_changed_utterances():
    assert word_diff_html("one two three", "one two three") == "one two three"
    marked = word_diff_html("one two three", "one five")
    assert '<span class="err">five</span>' in marked and "<del>three</del>" in marked
    assert "(empty)" in word_diff_html("one", "")
    assert "&lt;b&gt;" in word_diff_html("x", "<b>")  # hypotheses are escaped
    inp = inputs()
    rows = changed_utterances(inp.candidate, inp.production, 5)
    assert len(rows) == 5 and abs(rows[0]["change"]) >= abs(rows[-1]["change"])


def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    if CHROMIUM is None:
        pytest.fail("chromium not found: install it (Debian/Ubuntu: apt-get install -y chromium)")

    page = tmp_path / "report.html"
    page.write_text(render_html(inputs()), encoding="utf-8")
    shot = tmp_path / "report.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.exists(), f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    small = img.resize((300, 400))
    colors = small.getcolors(maxcolors=300 * 400)
    assert len(colors) > 200, f"only {len(colors)} distinct colors: blank page?"
    px = np.asarray(small, dtype=np.int32)
    non_background = (np.abs(px - np.array([243, 244, 246])).sum(axis=2) > 30).mean()
    assert non_background > 0.25, f"only {non_background:.0%} of the page differs from the background"
    # the red FAILED banner is at the top
    top = np.asarray(img.crop((100, 30, 1100, 120)), dtype=np.int32).reshape(-1, 3)
    red = ((top[:, 0] > 150) & (top[:, 1] < 60) & (top[:, 2] < 60)).mean()
    assert red > 0.3, f"the top of the page is not the red decision banner ({red:.0%} red)"


def test_forest_plot_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    if CHROMIUM is None:
        pytest.fail("chromium not found: install it (Debian/Ubuntu: apt-get install -y chromium)")
    forest = re.search(r'<svg class="forest".*?</svg>', render_html(inputs()), re.S).group(0)
    page = tmp_path / "forest.html"
    page.write_text(f'<!DOCTYPE html><html><body style="margin:0;background:#fff">{forest}</body></html>', encoding="utf-8")
    shot = _screenshot(page, tmp_path, "1000,700")
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32).reshape(-1, 3)

    def share(rgb: tuple[int, int, int]) -> float:
        return float((np.abs(px - np.array(rgb)).sum(axis=1) < 40).mean())

    # every verdict's colour is drawn (interval lines, point markers): regression, no evidence, too small to tell
    for name, rgb in (("regression", (185, 28, 28)), ("no evidence", (21, 128, 61)), ("too small", (161, 98, 7))):
        assert share(rgb) > 0.0005, f"the forest plot shows no {name} interval ({share(rgb):.4%} of its pixels)"
    assert share((255, 255, 255)) < 0.97, "the forest plot is blank"


def _screenshot(page, tmp_path, size: str):
    shot = tmp_path / (page.stem + ".png")
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", f"--window-size={size}", page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.exists(), f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return shot
