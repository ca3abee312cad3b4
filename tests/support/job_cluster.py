"""A local Ray cluster for Ray Jobs tests: a config with ``ray.submit: job`` on free ports and tmp folders,
a tiny run (demo corpus + ingest) for the job's stage, and an entrypoint held at a gate file."""

from __future__ import annotations

import contextlib
import random
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.cluster import ClusterNotUp, cluster_down, cluster_spec, cluster_up
from pipeline.cluster.node import busy_ports
from pipeline.config import Config, DemoConfig, LocalClusterConfig, ProxyConfig, RayConfig
from pipeline.demo.corpus import build_demo_corpus
from pipeline.run import RunContext
from pipeline.stages.ingest.stage import ingest
from pipeline.storage import open_store


def job_config(tmp: Path, **ray) -> Config:
    """A small config whose ``ray.cluster`` is a one-worker cluster on a free block of ports under ``tmp``."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    for _ in range(50):
        base = random.randrange(30000, 39000, 10)
        cluster = LocalClusterConfig(workers=1, cpus_per_worker=1, port=base, dashboard_port=base + 990,
                                     object_store_mb=100, dir=str(tmp / "cluster"), temp_dir=str(temp_dir),
                                     start_timeout_s=120)
        config = Config(demo=DemoConfig(weeks=1, utterances_per_week=40, golden_utterances=10, max_digits=2),
                        proxy=ProxyConfig(fraction=1.0, dev_fraction=0.25),
                        ray=RayConfig(address="auto", submit="job", cluster=cluster, **ray))
        if not busy_ports(cluster_spec(config).all_ports()):
            config.mlflow.tracking_uri = f"sqlite:///{tmp}/mlflow.db"
            config.mlflow.artifact_root = str(tmp / "mlartifacts")
            return config
    raise RuntimeError("no free block of ports for a test cluster")


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
        with contextlib.suppress(ClusterNotUp):
            cluster_down(spec)
        shutil.rmtree(spec.temp_dir, ignore_errors=True)


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
