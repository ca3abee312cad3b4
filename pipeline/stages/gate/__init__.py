"""Stage ``gate``: candidate vs production on the golden set (rules, groups, stage, report, charts, calibration)."""

from pipeline.stages.gate.rules import check_force, failing_rules
from pipeline.stages.gate.stage import gate, read_decision

__all__ = ["check_force", "failing_rules", "gate", "read_decision"]
