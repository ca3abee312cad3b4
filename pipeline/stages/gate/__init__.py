"""Stage ``gate``: candidate vs production on the golden set (rules, stage, report)."""

from pipeline.stages.gate.stage import gate, read_decision

__all__ = ["gate", "read_decision"]
