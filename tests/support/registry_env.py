"""Shared set-up of the tests that gate and register against a real ``mlflow server``.

* :func:`build_golden_store` — a store holding only a small demo golden set built from the
  real FSDD recordings (5 speakers, one never seen in training).
* :func:`registry_config` — a configuration whose ``mlflow`` section is the test's own
  (server, registered model, experiment, model cache), set as a user's config file sets it.
* :func:`put_candidate` — what the train stage leaves for the gate: model, metrics, history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.config import Config, DemoConfig, MlflowConfig
from pipeline.run import RunContext
from pipeline.storage import open_store

HISTORY = [{"epoch": e, "train_loss": 3.0 / e, "dev_wer": 1.0 / (e + 1)} for e in range(1, 6)]


def build_golden_store(root: Path, golden_utterances: int = 40) -> Path:
    from pipeline.demo.corpus import build_demo_corpus

    demo = DemoConfig(weeks=1, utterances_per_week=2, golden_utterances=golden_utterances, synthetic_fraction=0.0)
    build_demo_corpus(open_store(str(root)), demo, 8000, progress=False)
    shutil.rmtree(root / "incoming")
    return root


def registry_config(tracking_uri: str, cache: Path, *, name: str = "asr", experiment: str = "asr-retune-tests") -> Config:
    """A configuration tracking into ``tracking_uri``: registered model ``name``, its own experiment and model cache."""
    return Config(mlflow=MlflowConfig(tracking_uri=tracking_uri, artifact_root="", registered_model=name,
                                      experiment=experiment, model_cache=str(cache)))


def put_candidate(ctx: RunContext, model: Path) -> None:
    ctx.store.upload_file(ctx.stage_key("train", "model.pt"), model)
    ctx.store.put_text(ctx.stage_key("train", "metrics.json"), json.dumps({"dev_wer": 0.2, "pool_version": "pool-0007"}))
    ctx.store.put_text(ctx.stage_key("train", "history.json"), json.dumps(HISTORY))
