"""A local Ray cluster for Ray Jobs tests: a config with ``ray.submit: job`` on free ports and tmp folders,
a tiny run (demo corpus + ingest) for the job's stage, and an entrypoint held at a gate file."""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.cluster import cluster_spec, cluster_up
from pipeline.config import Config, DemoConfig, ProxyConfig
from pipeline.demo.corpus import build_demo_corpus
from pipeline.run import RunContext
from pipeline.stages.ingest.stage import ingest
from pipeline.storage import open_store
from support.cluster_env import free_cluster_config, stop_cluster


def job_config(tmp: Path, **ray) -> Config:
    """A small config whose ``ray.cluster`` is a one-worker cluster on a free block of ports under ``tmp``."""
    config = Config(demo=DemoConfig(weeks=1, utterances_per_week=40, golden_utterances=10, max_digits=2),
                    proxy=ProxyConfig(fraction=1.0, dev_fraction=0.25),
                    ray=free_cluster_config(tmp / "cluster", workers=1, submit="job", **ray))
    config.mlflow.tracking_uri = f"sqlite:///{tmp}/mlflow.db"
    config.mlflow.artifact_root = str(tmp / "mlartifacts")
    return config


def write_config(config: Config, path: Path) -> Path:
    path.write_text(config.to_yaml())
    return path


@contextlib.contextmanager
def running_cluster(config: Config) -> Iterator[dict]:
    """``cluster up`` for ``config``; always down (and its temp dir removed) afterwards."""
    spec = cluster_spec(config)
    try:
        yield cluster_up(spec)
    finally:
        stop_cluster(spec)


def demo_run(config: Config, root: Path, run_id: str, *, ingested: bool = True) -> RunContext:
    """A run on a tiny demo corpus under ``root``; ``ingested``: with its pool (what proxy and features read)."""
    store = open_store(str(root))
    build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
    ctx = RunContext(run_id=run_id, config=config, store=store)
    if ingested:
        ingest(ctx, progress=False)
    return ctx


def gated_entrypoint(gate: Path) -> str:
    """A ``ray.job_entrypoint`` that waits until ``gate`` exists, then runs the CLI: the job is RUNNING
    for as long as the test keeps the gate closed."""
    cli = str(Path(sys.executable).with_name("asr-retune"))
    script = f'until [ -e {shlex.quote(str(gate))} ]; do sleep 0.2; done; echo "gate open"; exec "$0" "$@"'
    return shlex.join(["sh", "-c", script, cli])


def jobs_of(client, run_id: str, stage: str) -> list:
    """The cluster's jobs of ``stage`` in run ``run_id`` (from the metadata pipeline.jobs gives them)."""
    return [j for j in client.list_jobs()
            if (j.metadata or {}).get("asr_retune_run_id") == run_id and j.metadata.get("asr_retune_stage") == stage]
