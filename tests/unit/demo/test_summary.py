"""pipeline.demo.summary: stage lines and the week table from stage summaries."""

from __future__ import annotations

from pipeline.demo.summary import render_table, stage_line, week_row

INGEST = {"accepted": 600, "quarantined": [], "drops": ["week-002"], "pool_size": 1200}
SEARCH = {"trials": 4, "statuses": {"completed": 2, "asha_stopped": 2, "error": 0},
          "selection": {"decision": "incumbent-kept", "winner_dev_wer": 0.70, "incumbent_dev_wer": 0.0458}}
GATE_PASS = {"passed": True, "cold_start": False, "failing_rules": [], "candidate_wer": 0.110, "production_wer": 0.353,
             "production_version": "1", "delta_wer": -0.243, "delta_ci": [-0.277, -0.208], "golden_version": "v2"}
DEPLOY = {"outcome": "promoted", "reason": "healthy at every step", "version": "2", "default_version": "2",
          "steps": [{"weight": 5.0, "result": "passed"}, {"weight": 25.0, "result": "passed"},
                    {"weight": 100.0, "result": "passed"}]}


def test_stage_lines_carry_time_and_key_figures():
    assert stage_line("ingest", INGEST, 12.4) == "  ingest       12s  +600 accepted, 0 quarantined from week-002 · pool 1200"
    line = stage_line("gate", GATE_PASS, 75)
    assert "1m15s" in line and "PASSED" in line and "11.00%" in line and "-24.3 [-27.7, -20.8]" in line
    assert "70.0% vs 4.6%: incumbent kept" in stage_line("search", SEARCH)
    assert "5→25→100 promoted" in stage_line("deploy", DEPLOY)
    assert stage_line("register", {"registered": False, "reason": "gate failed"}).endswith("not registered (gate failed)")


def test_week_rows_tell_promotion_and_refusal_apart():
    promoted = week_row(2, "week-002", {"ingest": INGEST, "search": SEARCH, "gate": GATE_PASS, "deploy": DEPLOY}, 301)
    assert (promoted.decision, promoted.canary, promoted.serving, promoted.wall) == ("PASSED", "5→25→100 promoted", "v2", "5m01s")
    refused_gate = {**GATE_PASS, "passed": False, "failing_rules": ["delta_wer"], "candidate_wer": 0.2,
                    "production_version": "2", "delta_wer": 0.09, "delta_ci": [0.05, 0.12]}
    refused = week_row(3, "week-003", {"ingest": INGEST, "search": SEARCH, "gate": refused_gate})
    assert (refused.decision, refused.canary, refused.serving) == ("FAILED", "-", "v2")
    assert refused.delta == "+9.0 [+5.0, +12.0]"
    cold = week_row(1, "week-001", {"ingest": INGEST, "gate": {"passed": True, "cold_start": True, "candidate_wer": 0.35},
                                    "deploy": {**DEPLOY, "version": "1"}})
    assert cold.decision == "PASSED (cold)" and cold.production == "-" and cold.serving == "v1"
    cold_deploy = {"outcome": "promoted", "reason": "cold_start", "steps": [], "version": "1", "default_version": "1"}
    assert week_row(1, "week-001", {"deploy": cold_deploy}).canary == "none (cold) promoted"
    assert stage_line("deploy", cold_deploy).endswith("canary none (cold) promoted · serving v1")
    table = render_table([cold, promoted, refused]).splitlines()
    assert len(table) == 5 and table[0].startswith("week  drop") and set(table[1]) <= {"-", " "}
    assert all(len(row) <= len(table[1]) for row in table)


def promoted_row():
    return week_row(2, "week-002", {"ingest": INGEST, "search": SEARCH, "gate": GATE_PASS, "deploy": DEPLOY})


def test_a_week_that_stopped_early_still_has_a_row():
    row = week_row(1, "week-001", {"ingest": INGEST})
    assert row.decision == "not reached" and row.serving == "none" and row.candidate == "-"
    assert promoted_row().candidate == "11.0%" and promoted_row().production == "v1 35.3%"


def test_the_demo_ends_with_the_table_of_weeks(tmp_path, capsys):
    from pipeline.config import Config
    from pipeline.demo.weekly import _print_end
    from pipeline.run import RunContext
    from pipeline.storage import LocalStore

    store, config = LocalStore(tmp_path / "store"), Config()
    weeks = []
    for week, gate in ((1, {"passed": True, "cold_start": True, "candidate_wer": 0.35}), (2, GATE_PASS)):
        ctx = RunContext(run_id=f"manual__{week}", config=config, store=store)
        for stage, summary in (("ingest", INGEST), ("search", SEARCH), ("gate", gate), ("deploy", DEPLOY)):
            ctx.mark_complete(stage, summary)
        weeks.append({"week": week, "drop": f"week-00{week}", "run_id": ctx.run_id, "wall_s": 60.0 * week})
    _print_end(store, config, weeks, ["serving: asr-retune serve status"])
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert lines[-4].startswith("week  drop") and lines[-2].startswith("1     week-001")
    assert lines[-1].startswith("2     week-002") and "PASSED" in lines[-1] and "5→25→100 promoted" in lines[-1]
