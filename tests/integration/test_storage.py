"""Object store against a local folder and against moto's real S3 HTTP server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from support.faultproxy import Fault, FaultProxy

from pipeline.config import StorageConfig
from pipeline.storage import LocalStore, ObjectNotFound, StorageError, open_store

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(f"file://{tmp_path}/root")
    bucket = request.getfixturevalue("s3_bucket")
    cfg = request.getfixturevalue("s3_config")
    return open_store(f"s3://{bucket}/some/prefix", cfg.storage)


def test_put_get_exists_delete(store):
    assert not store.exists("a/b.txt")
    store.put_text("a/b.txt", "hello")
    assert store.exists("a/b.txt")
    assert store.get_text("a/b.txt") == "hello"
    assert store.size("a/b.txt") == 5
    with store.open_read("a/b.txt") as f:
        assert f.read() == b"hello"
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    store.delete("a/b.txt")  # idempotent
    with pytest.raises(ObjectNotFound, match="a/b.txt"):
        store.get_bytes("a/b.txt")


def test_list_is_recursive_sorted_and_prefix_scoped(store):
    for k in ["x/1", "x/2/3", "x/22", "y/1", "xz"]:
        store.put_bytes(k, b"1")
    assert list(store.list("x/")) == ["x/1", "x/2/3", "x/22"]
    assert list(store.list("x")) == ["x/1", "x/2/3", "x/22", "xz"]
    assert store.list_dirs("x") == ["2"]
    assert len(list(store.list())) == 5


def test_listing_more_than_1000_keys(store):
    if isinstance(store, LocalStore):
        n = 1005
    else:
        n = 1005  # S3 pages at 1000: the paginator must be followed
    for i in range(n):
        store.put_bytes(f"many/{i:05d}", b"")
    keys = list(store.list("many/"))
    assert len(keys) == n and keys[0] == "many/00000" and keys[-1] == f"many/{n - 1:05d}"


def test_multipart_object_over_16mb(store, tmp_path):
    data = os.urandom(17 * 1024 * 1024 + 123)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.upload_file("big/obj.bin", src)
    assert store.size("big/obj.bin") == len(data)
    out = tmp_path / "back.bin"
    store.download_file("big/obj.bin", out)
    assert out.read_bytes() == data
    # streaming read in chunks
    got = bytearray()
    with store.open_read("big/obj.bin") as f:
        while chunk := f.read(1 << 20):
            got += chunk
    assert bytes(got) == data


def test_multipart_really_used_on_s3(s3_bucket, moto_server, aws_env, tmp_path):
    proxy = FaultProxy(moto_server)
    url = proxy.start()
    try:
        store = open_store(f"s3://{s3_bucket}/mp", StorageConfig(s3_endpoint_url=url))
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(17 * 1024 * 1024))
        store.upload_file("obj", src)
        parts = [p for m, p, _ in proxy.seen if m == "PUT" and "partNumber=" in p]
        assert len(parts) >= 3
    finally:
        proxy.stop()


def test_atomic_write_interrupted_leaves_nothing(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.atomic_write("atomic/obj.bin") as f:
            f.write(os.urandom(20 * 1024 * 1024))
            raise RuntimeError("boom")
    assert not store.exists("atomic/obj.bin")
    assert list(store.list("atomic/")) == []
    with store.atomic_write("atomic/obj.bin") as f:
        f.write(b"complete")
    assert store.get_bytes("atomic/obj.bin") == b"complete"


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    from pipeline.config import StorageConfig
    from pipeline.storage import open_store
    store = open_store(sys.argv[1], StorageConfig(s3_endpoint_url=sys.argv[2] or None))
    with store.atomic_write("killed/obj.bin") as f:
        for _ in range(8):
            f.write(os.urandom(5 * 1024 * 1024))
    print("finished", flush=True)
    """
)


@pytest.mark.scenario(3, expected="a writer killed mid multipart upload leaves no object and no partial object")
def test_process_killed_mid_multipart_upload_leaves_nothing(s3_bucket, moto_server, aws_env, observe):
    proxy = FaultProxy(moto_server, faults=[Fault(lambda m, p: "partNumber=" in p, times=100, delay_s=1.0)])
    url = proxy.start()
    try:
        child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, f"s3://{s3_bucket}/k", url], stdout=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and not any("partNumber=" in p for _, p in proxy.arrived):
            time.sleep(0.05)
        assert any("partNumber=" in p for _, p in proxy.arrived), "upload never reached the parts"
        assert not any("uploadId=" in p and m == "POST" for m, p in proxy.arrived), "killed too late: upload completed"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        store = open_store(f"s3://{s3_bucket}/k", StorageConfig(s3_endpoint_url=moto_server))
        assert not store.exists("killed/obj.bin")
        assert list(store.list()) == []
        parts = sum("partNumber=" in p for _, p in proxy.arrived)
        observe(f"writer SIGKILLed after {parts} part request(s) reached S3; 0 objects under the prefix afterwards")
    finally:
        proxy.stop()


@pytest.mark.scenario(3, expected="throttling (503 SlowDown) and 500s between the pipeline and S3 are retried; "
                                   "the write and read succeed")
def test_throttling_and_5xx_are_retried(s3_bucket, moto_server, aws_env, observe):
    faults = [
        Fault(lambda m, p: m == "PUT", status=503, code="SlowDown", times=2),
        Fault(lambda m, p: m == "GET", status=500, code="InternalError", times=2),
    ]
    proxy = FaultProxy(moto_server, faults=faults)
    url = proxy.start()
    try:
        store = open_store(f"s3://{s3_bucket}/r", StorageConfig(s3_endpoint_url=url, retry_max_attempts=5))
        store.put_text("k.txt", "survived")
        assert store.get_text("k.txt") == "survived"
        statuses = [s for _, _, s in proxy.seen]
        assert statuses.count(503) == 2 and statuses.count(500) == 2
        observe(f"{statuses.count(503)} x 503 and {statuses.count(500)} x 500 injected, {len(statuses)} requests in all; "
                "object written and read back intact")
    finally:
        proxy.stop()


@pytest.mark.scenario(3, expected="a permanent S3 failure raises an error naming the key, without credentials")
def test_permanent_failure_names_key_and_hides_credentials(s3_bucket, moto_server, aws_env, observe):
    proxy = FaultProxy(moto_server, faults=[Fault(lambda m, p: True, status=503, times=1000)])
    url = proxy.start()
    try:
        store = open_store(f"s3://{s3_bucket}/p", StorageConfig(s3_endpoint_url=url, retry_max_attempts=2))
        with pytest.raises(StorageError) as err:
            store.put_text("dir/name.txt", "x")
        msg = str(err.value)
        assert f"s3://{s3_bucket}/p/dir/name.txt" in msg and "SlowDown" in msg
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in msg and os.environ["AWS_ACCESS_KEY_ID"] not in msg
        assert "secret" not in repr(store).lower()
        observe(f"after {len(proxy.seen)} attempts: {msg[:160]}")
    finally:
        proxy.stop()


def test_bad_keys_and_roots_are_refused(tmp_path):
    store = open_store(str(tmp_path))
    for bad in ["", "/abs", "a/../b", "a//b"]:
        with pytest.raises(StorageError, match="invalid object key"):
            store.put_bytes(bad, b"")
    with pytest.raises(StorageError, match="unsupported"):
        open_store("gs://bucket/x")
