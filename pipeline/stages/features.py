"""Stage ``features``: log-mel features of the training pool, with a content-addressed cache.

The front end is :mod:`pipeline.asr.frontend` (one definition shared with training and
the exported model); the shards and a run's index are :mod:`pipeline.data.features`; the
extraction is :func:`pipeline.asr.extraction.extract_pool_features`. Features outlive
runs (``state/features/{frontend_hash}/``): a weekly run computes only audio whose sha256
is in no shard yet, and reuses the old shards as they are.

**Run output** ``runs/{run_id}/features/``: ``index.json`` (the front end, the pool
version, the pool's per-bin statistics, and where each utterance's features are) and
``stats.json`` (the statistics alone). The search and train stages build other front ends
the same way, as partitions ``features-{hash[:12]}`` of the same run.
"""

from __future__ import annotations

from typing import Any

from pipeline.asr.extraction import extract_pool_features
from pipeline.config import FeatureConfig
from pipeline.run import RunContext


def extract_features(
    ctx: RunContext, *, progress: bool = True, frontend: FeatureConfig | None = None
) -> dict[str, Any]:
    """Stage: log-mel features of the current pool, computing only audio not yet cached.

    ``frontend`` overrides ``config.features``; it gets its own cache and its own stage
    name (:func:`pipeline.asr.extraction.name_features_stage`). Returns the summary stored
    in ``_SUCCESS``: ``computed``/``reused`` utterances, ``new_shards``, ``frames``, the
    ``index_uri``, timings, plus ``run_id``/``stage``/``skipped``.
    """
    return extract_pool_features(ctx, frontend, progress=progress)
