"""Incoming drops for the ingest tests against moto's S3 server (shared by the integration and
reliability suites): a drop's lines, files and expected outcome, upload in the producers'
order (audio first, manifest last), store snapshots, a fresh bucket with dummy credentials."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.config import Config, IngestConfig, StorageConfig
from pipeline.storage import ObjectStore, open_store
from support.wavfactory import make_audio


@dataclass(frozen=True)
class Drop:
    """The lines and files of one drop, and what ingestion must do with each utt_id."""

    drop_id: str
    lines: list[bytes]
    files: dict[str, bytes]
    accepted: set[str]
    rejected: dict[str, str]  # utt_id -> reason
    unparseable: int


def nan_audio() -> bytes:
    """A float WAV with one NaN sample (``non_finite``)."""
    samples = np.full((8000, 1), 0.1, dtype=np.float32)
    samples[123, 0] = np.nan
    return make_audio(samples=samples, subtype="FLOAT")


def upload(store: ObjectStore, drop: Drop) -> None:
    for name, data in drop.files.items():
        store.put_bytes(f"incoming/{drop.drop_id}/{name}", data)
    store.put_bytes(f"incoming/{drop.drop_id}/manifest.jsonl", b"\n".join(drop.lines) + b"\n")  # manifest last


def snapshot(store: ObjectStore) -> dict[str, bytes]:
    return {key: store.get_bytes(key) for key in store.list()}


def check_invariant(summary: dict) -> None:
    assert summary["accepted"] + len(summary["quarantined"]) + summary["unparseable_lines"] == summary["lines_read"]


@contextlib.contextmanager
def s3_credentials() -> Iterator[None]:
    """Dummy AWS credentials for moto (and no real profile or endpoint from the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "AKIAINGESTTEST000001")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "ingest-test-secret-not-real")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        yield


def bucket_env(endpoint: str, rules: IngestConfig) -> tuple[str, Config, ObjectStore]:
    """A fresh bucket on ``endpoint``: (bucket, config with ``rules``, store rooted at s3://bucket/pfx)."""
    import boto3

    bucket = f"ingest-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    cfg = Config(storage=StorageConfig(s3_endpoint_url=endpoint, retry_max_attempts=3), ingest=rules)
    return bucket, cfg, open_store(f"s3://{bucket}/pfx", cfg.storage)
