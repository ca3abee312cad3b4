"""Builds a small real pipeline run (demo corpus -> ingest -> features -> proxy) for tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import Config, DemoConfig, ProxyConfig, SearchConfig, TrainConfig
from pipeline.demo.corpus import build_demo_corpus
from pipeline.run import RunContext
from pipeline.stages.features import extract_features
from pipeline.stages.ingest.stage import ingest
from pipeline.stages.proxy import sample_proxy
from pipeline.storage import open_store

SMALL_SPACE = {
    "params": {
        "n_mels": {"kind": "choice", "values": [40]},
        "encoder": {"kind": "choice", "values": ["conformer"]},
        "num_layers": {"kind": "int", "low": 1, "high": 2},
        "d_model": {"kind": "choice", "values": [32, 64]},
        "attention_heads": {"kind": "choice", "values": [2, 4], "when": {"encoder": ["conformer", "transformer"]}},
        "lr": {"kind": "loguniform", "low": 1e-4, "high": 5e-3},
        "optimizer": {"kind": "choice", "values": ["adamw", "sgd"]},
        "beta2": {"kind": "uniform", "low": 0.95, "high": 0.999, "when": {"optimizer": "adamw"}},
        "momentum": {"kind": "uniform", "low": 0.8, "high": 0.95, "when": {"optimizer": "sgd"}},
    }
}


def small_config(root: Path, **search) -> Config:
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SMALL_SPACE, sort_keys=False))
    search_cfg = {
        "space_file": str(space), "trials": 5, "budget_s": 300, "max_epochs": 3, "grace_period": 1,
        "reduction_factor": 2, "max_concurrent": 2, "metric": "dev_loss", "warm_start_top_k": 1, **search,
    }
    config = Config(
        demo=DemoConfig(weeks=1, utterances_per_week=40, golden_utterances=10, max_digits=2),
        proxy=ProxyConfig(fraction=1.0, dev_fraction=0.25),
        train=TrainConfig(batch_size=8, warmup_steps=5),
        search=SearchConfig(**search_cfg),
    )
    config.mlflow.tracking_uri = f"sqlite:///{root}/mlflow.db"
    config.mlflow.artifact_root = str(root / "mlartifacts")
    return config


def make_proxy_run(root: Path, run_id: str, **search) -> RunContext:
    config = small_config(root, **search)
    store = open_store(str(root / "store"))
    build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
    ctx = RunContext(run_id=run_id, config=config, store=store)
    ingest(ctx, progress=False)
    extract_features(ctx, progress=False)
    sample_proxy(ctx)
    return ctx
