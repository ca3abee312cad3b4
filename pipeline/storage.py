"""One object-store interface over a local folder and S3 (boto3).

Roots are a local path, ``file:///abs/path`` or ``s3://bucket/prefix``. Keys are
``/``-separated and relative to the root. Every write is atomic: a local write goes to a
temporary file in the same folder and is renamed into place; an S3 write is spooled
locally and sent as one PUT or one multipart upload, which S3 makes visible only when it
completes (an interrupted multipart upload is aborted and never appears in a listing).

S3 errors are retried by botocore (``standard``/``adaptive`` retry modes cover throttling
and 5xx); what is still failing afterwards raises :class:`StorageError` naming the key and
the error code, never the credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO
from urllib.parse import urlparse

from pipeline.config import StorageConfig

_SPOOL_MAX = 16 * 1024 * 1024


class StorageError(RuntimeError):
    """An object-store operation failed; the message names the key (never the credentials)."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("..", "") for p in key.split("/")):
        raise StorageError(f"invalid object key {key!r}: keys are relative, '/'-separated, without '..' or empty parts")
    return key


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def join(*parts: str) -> str:
    """Join key parts with '/', dropping empty parts and duplicate slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class ObjectStore(ABC):
    """put/get/list/exists/delete/atomic write/streaming over one root."""

    root: str

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A readable binary stream (the caller closes it)."""

    @abstractmethod
    def upload_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abstractmethod
    def download_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (recursively), sorted, paging through as needed."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one key; deleting a missing key is not an error."""

    @abstractmethod
    def size(self, key: str) -> int: ...

    @contextlib.contextmanager
    def atomic_write(self, key: str) -> Iterator[IO[bytes]]:
        """Write a binary stream that becomes visible at ``key`` only if the block succeeds."""
        _check_key(key)
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX) as spool:
            yield spool
            spool.flush()
            spool.seek(0)
            self._commit_stream(key, spool)

    @abstractmethod
    def _commit_stream(self, key: str, stream: IO[bytes]) -> None: ...

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def list_dirs(self, prefix: str) -> list[str]:
        """Immediate child 'folders' under ``prefix`` (names only)."""
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out: set[str] = set()
        for key in self.list(prefix):
            rest = key[len(prefix):]
            if "/" in rest:
                out.add(rest.split("/", 1)[0])
        return sorted(out)

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        for key in list(self.list(prefix)):
            self.delete(key)
            n += 1
        return n


class LocalStore(ObjectStore):
    def __init__(self, root: str | os.PathLike):
        self.base = Path(root).expanduser().resolve()
        self.root = str(self.base)

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _path(self, key: str) -> Path:
        return self.base / _check_key(key)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_bytes(self, key: str, data: bytes) -> None:
        self._commit_stream(key, io.BytesIO(data))

    def _commit_stream(self, key: str, stream: IO[bytes]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(stream, f, 1024 * 1024)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"object not found: {self.uri(key)}") from None

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"object not found: {self.uri(key)}") from None

    def upload_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as f:
            self._commit_stream(key, f)

    def download_file(self, key: str, path: str | os.PathLike) -> None:
        with self.open_read(key) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.base
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = base / folder if folder else base
        if not start.is_dir():
            return iter(())
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(".") and ".tmp-" in name:
                    continue  # an in-flight atomic write is never visible
                rel = (Path(dirpath) / name).relative_to(base).as_posix()
                if rel.startswith(prefix):
                    keys.append(rel)
        return iter(sorted(keys))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # prune empty folders up to the root
        parent = path.parent
        while parent != self.base and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"object not found: {self.uri(key)}") from None


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str, config: StorageConfig, client=None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config as BotoConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client or boto3.client(
            "s3",
            endpoint_url=config.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None,
            region_name=config.s3_region,
            config=BotoConfig(
                retries={"max_attempts": config.retry_max_attempts, "mode": config.retry_mode},
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.read_timeout_s,
            ),
        )
        mb = 1024 * 1024
        self.transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold_mb * mb,
            multipart_chunksize=config.multipart_chunk_mb * mb,
        )

    def __repr__(self) -> str:
        return f"S3Store({self.root!r})"

    def _key(self, key: str) -> str:
        return join(self.prefix, _check_key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _fail(self, op: str, key: str, exc: Exception) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = err.get("Code", "?")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectNotFound(f"object not found: {self.uri(key)}")
            return StorageError(f"{op} {self.uri(key)} failed: {code} (HTTP {status})")
        return StorageError(f"{op} {self.uri(key)} failed: {type(exc).__name__}")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._commit_stream(key, io.BytesIO(data))

    def _commit_stream(self, key: str, stream: IO[bytes]) -> None:
        try:
            self.client.upload_fileobj(stream, self.bucket, self._key(key), Config=self.transfer)
        except Exception as exc:  # noqa: BLE001 - re-raised with the key named
            raise self._fail("write", key, exc) from None

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as body:
            return body.read()

    def open_read(self, key: str) -> BinaryIO:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            raise self._fail("read", key, exc) from None
        return _Body(resp["Body"], self, key)

    def upload_file(self, key: str, path: str | os.PathLike) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("upload", key, exc) from None

    def download_file(self, key: str, path: str | os.PathLike) -> None:
        tmp = Path(f"{path}.part-{uuid.uuid4().hex}")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("download", key, exc) from None
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        full = join(self.prefix, prefix) + ("/" if prefix.endswith("/") else "")
        if self.prefix and not prefix:
            full = self.prefix + "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"][cut:]
        except Exception as exc:  # noqa: BLE001
            raise self._fail("list", prefix or ".", exc) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:  # noqa: BLE001
            err = self._fail("head", key, exc)
            if isinstance(err, ObjectNotFound):
                return False
            raise err from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            raise self._fail("delete", key, exc) from None

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as exc:  # noqa: BLE001
            raise self._fail("head", key, exc) from None


class _Body(io.RawIOBase):
    """A streaming S3 body that names the key when a read fails."""

    def __init__(self, body, store: S3Store, key: str):
        self._body, self._store, self._key = body, store, key

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._body.read(len(b))
        except Exception as exc:  # noqa: BLE001
            raise self._store._fail("read", self._key, exc) from None
        b[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        try:
            return self._body.read() if size is None or size < 0 else self._body.read(size)
        except Exception as exc:  # noqa: BLE001
            raise self._store._fail("read", self._key, exc) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


def open_store(root: str | None = None, config: StorageConfig | None = None) -> ObjectStore:
    """Open the store at ``root`` (default: ``config.root``); relative paths are relative to the cwd."""
    config = config or StorageConfig()
    root = root or config.root
    if root.startswith("s3://"):
        parsed = urlparse(root)
        if not parsed.netloc:
            raise StorageError(f"s3 root {root!r} has no bucket")
        return S3Store(parsed.netloc, parsed.path, config)
    if root.startswith("file://"):
        parsed = urlparse(root)
        return LocalStore(parsed.path)
    if "://" in root:
        raise StorageError(f"unsupported store root {root!r}: use a local path, file://... or s3://bucket/prefix")
    return LocalStore(root)
