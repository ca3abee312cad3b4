"""Shared fixtures: a real moto S3 server on 127.0.0.1 and config factories."""

from __future__ import annotations

import uuid

import pytest

from pipeline.config import Config, StorageConfig
from pipeline.serving.ports import free_port

pytest_plugins = ["support.scorecard"]  # the reliability scorecard (make reliability)



@pytest.fixture(scope="session")
def moto_server():
    """moto's S3-compatible HTTP server, started for real on 127.0.0.1 (not an in-process mock)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTSECRETKEYID01")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-do-not-log-0123456789")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_bucket(moto_server, aws_env) -> str:
    """A fresh bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_config(moto_server) -> Config:
    return Config(storage=StorageConfig(s3_endpoint_url=moto_server, retry_max_attempts=3))
