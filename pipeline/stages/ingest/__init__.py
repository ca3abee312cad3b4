"""Stage ``ingest``: validate new drops into the training pool (rules and the stage)."""

from pipeline.stages.ingest.stage import ingest

__all__ = ["ingest"]
