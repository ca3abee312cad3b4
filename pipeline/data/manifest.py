"""Utterance manifests: NeMo-compatible JSON Lines, one utterance per line.

A line of the pipeline's own manifests (the pool, proxy sets) has every field:
``{"audio_filepath": "../../audio/ab/abcd....wav", "duration": 2.41, "group": "USA/neutral",
"sha256": "abcd...", "speaker": "jackson", "text": "seven three one", "utt_id": "..."}``
(keys sorted, UTF-8, ``\\n`` after every line), plus ``drop`` in the training pool;
:func:`parse_manifest` reads them strictly.

A manifest as NeMo writes it (:class:`NemoManifest`: golden sets, on-call evaluation) needs only
``audio_filepath``, ``duration`` and ``text``. Its ``audio_filepath`` is relative to the
manifest's folder, absolute, or a ``file://``/``s3://`` URI; a missing ``speaker``/``group`` is
``unknown``, a missing ``sha256`` is computed from the audio bytes, and a missing ``utt_id`` is
:func:`derive_utt_id` of the audio's path. Unknown keys are ignored on reading (NeMo tools add some).
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.config import StorageConfig
from pipeline.storage import LocalStore, ObjectStore, S3Store, StorageError, open_store

__all__ = [
    "UNKNOWN",
    "ManifestError",
    "NemoManifest",
    "Utterance",
    "derive_utt_id",
    "dumps_manifest",
    "parse_manifest",
    "read_manifest",
    "relative_audio_path",
    "resolve_audio_key",
    "write_manifest",
]


UNKNOWN = "unknown"  # the speaker/group of a record that names none
MAX_UTT_ID = 200
_UTT_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.+\-]+")


class ManifestError(ValueError):
    """A manifest line is not a valid utterance; the message names the line and field."""


def derive_utt_id(path: str, prefix: str | None = None) -> str:
    """The utt_id of a record that has none: ``[PREFIX:]`` + its audio path without the extension.

    Every run of characters outside ``[A-Za-z0-9_.+-]`` becomes ``-`` and leading/trailing
    ``-._+`` are dropped (``audio/spk 1/0001.wav`` -> ``audio-spk-1-0001``). A path with no such
    character left is ``utt-`` + 12 hex digits of its sha256; one over 200 characters keeps its
    first 183 and appends ``-`` + 16 hex digits, so ids stay distinct. Ingest passes the path
    within the drop and the drop id as ``prefix``; evaluation, the path relative to the manifest.
    """
    digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()
    body = _UTT_ID_UNSAFE.sub("-", posixpath.splitext(path)[0]).strip("-._+") or f"utt-{digest[:12]}"
    utt_id = f"{prefix}:{body}" if prefix else body
    return utt_id if len(utt_id) <= MAX_UTT_ID else f"{utt_id[:MAX_UTT_ID - 17]}-{digest[:16]}"


@dataclass(frozen=True)
class Utterance:
    """One manifest record (the DESIGN manifest fields, plus the drop it came from in the pool)."""

    audio_filepath: str
    duration: float
    text: str
    speaker: str
    group: str
    utt_id: str
    sha256: str
    drop: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this record (``drop`` left out when unset)."""
        record = asdict(self)
        if record["drop"] is None:
            del record["drop"]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Utterance":
        """Build from a parsed manifest object; raise :class:`ManifestError` naming a bad field."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = record.get(f.name)
            if f.name == "drop":
                if value is not None and not isinstance(value, str):
                    raise ManifestError(f"field 'drop' must be a string, got {value!r}")
                values[f.name] = value
            elif f.name == "duration":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ManifestError(f"field 'duration' must be a finite number, got {value!r}")
                values[f.name] = float(value)
            else:
                if not isinstance(value, str):
                    raise ManifestError(f"field {f.name!r} must be a string, got {value!r}")
                values[f.name] = value
        return cls(**values)

    @classmethod
    def from_nemo(
        cls, record: dict[str, Any], *, utt_id: Callable[[str], str], sha256: Callable[[str], str]
    ) -> "Utterance":
        """Build from a line as NeMo writes it: only ``audio_filepath``, ``duration`` and ``text``
        are required. A missing (or null) ``speaker``/``group`` is ``unknown``; a missing ``utt_id``
        is ``utt_id(audio_filepath)``; a missing or empty ``sha256`` is ``sha256(audio_filepath)``,
        called only once every other field is valid."""
        path = record.get("audio_filepath")
        if not isinstance(path, str) or not path:
            raise ManifestError(f"field 'audio_filepath' must be a non-empty string, got {path!r}")
        filled = dict(record)
        for name in ("speaker", "group"):
            if filled.get(name) is None:
                filled[name] = UNKNOWN
        if filled.get("utt_id") is None:
            filled["utt_id"] = utt_id(path)
        if filled.get("sha256") is None:
            filled["sha256"] = ""
        utt = cls.from_dict(filled)
        return utt if utt.sha256 else replace(utt, sha256=sha256(path))


def dumps_manifest(utterances: Iterable[Utterance]) -> bytes:
    """Serialize to JSON Lines bytes: sorted keys, UTF-8, one ``\\n``-terminated line each."""
    lines = [json.dumps(u.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for u in utterances]
    return "".join(lines).encode("utf-8")


def _records(data: bytes, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, JSON object)`` of each non-blank line; a line that is not an object raises."""
    for number, raw in enumerate(data.decode("utf-8").split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source} line {number}: {exc}") from None
        if not isinstance(record, dict):
            raise ManifestError(f"{source} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def parse_manifest(data: bytes, source: str = "<manifest>") -> list[Utterance]:
    """Parse a trusted manifest (e.g. the pool); blank lines are skipped, anything else invalid raises."""
    out: list[Utterance] = []
    for number, record in _records(data, source):
        try:
            out.append(Utterance.from_dict(record))
        except ManifestError as exc:
            raise ManifestError(f"{source} line {number}: {exc}") from None
    return out


def read_manifest(store: ObjectStore, key: str) -> list[Utterance]:
    """Read and parse the manifest at ``key`` of ``store``."""
    return parse_manifest(store.get_bytes(key), source=store.uri(key))


def write_manifest(store: ObjectStore, key: str, utterances: Iterable[Utterance]) -> bytes:
    """Write the manifest atomically at ``key``; return the bytes written (e.g. to hash them)."""
    data = dumps_manifest(utterances)
    store.put_bytes(key, data)
    return data


def resolve_audio_key(manifest_key: str, audio_filepath: str) -> str:
    """The store key of a relative ``audio_filepath`` of the manifest at ``manifest_key``.

    Raises ``ValueError`` for URIs, absolute paths and paths that leave the store root.
    """
    if "://" in audio_filepath or audio_filepath.startswith("/"):
        raise ValueError(f"audio_filepath {audio_filepath!r} is not a relative path")
    key = posixpath.normpath(posixpath.join(posixpath.dirname(manifest_key), audio_filepath))
    if key == "." or key.startswith("../") or key == "..":
        raise ValueError(f"audio_filepath {audio_filepath!r} leaves the store root from {manifest_key!r}")
    return key


def relative_audio_path(manifest_key: str, audio_key: str) -> str:
    """``audio_key`` written relative to the folder of the manifest at ``manifest_key``."""
    return posixpath.relpath(audio_key, posixpath.dirname(manifest_key) or ".")


class NemoManifest:
    """A manifest as NeMo writes it, at ``key`` of ``store``: its utterances, and the audio they name.

    ``audio_filepath`` may be relative to the manifest's folder (read through ``store`` when it stays
    inside it; else resolved on the filesystem or in the store's bucket), an absolute path, or a
    ``file://``/``s3://`` URI (another bucket is read with the same S3 client, or one made from
    ``storage_config``). Stores opened for such paths are kept for the manifest's lifetime. A
    record without ``sha256`` has its audio read once more, to compute it.
    """

    def __init__(self, store: ObjectStore, key: str, storage_config: StorageConfig | None = None):
        self.store, self.key, self.storage_config = store, key, storage_config
        self.uri = store.uri(key)
        self._stores: dict[str, ObjectStore] = {}
        self._folder = _location(store, posixpath.dirname(key) or ".").rstrip("/") + "/"

    def utterances(self) -> list[Utterance]:
        """Every record, completed (see :meth:`Utterance.from_nemo`); a bad one raises naming its line."""
        out: list[Utterance] = []
        lines: dict[str, int] = {}
        for number, record in _records(self.store.get_bytes(self.key), self.uri):
            try:
                utt = Utterance.from_nemo(record, utt_id=self.derive_utt_id, sha256=self.audio_sha256)
            except (ValueError, StorageError) as exc:  # ManifestError, a bad location, missing audio
                raise ManifestError(f"{self.uri} line {number}: {exc}") from None
            if record.get("utt_id") is None and utt.utt_id in lines:
                raise ManifestError(
                    f"{self.uri} line {number}: the utt_id derived from its audio path, {utt.utt_id!r}, is also "
                    f"line {lines[utt.utt_id]}'s; give these records their own utt_id"
                )
            lines.setdefault(utt.utt_id, number)
            out.append(utt)
        return out

    def locate(self, audio_filepath: str) -> tuple[ObjectStore, str]:
        """The store and key of the audio a record names; ``ValueError`` for what cannot be read."""
        path = audio_filepath
        if "://" not in path and not path.startswith("/"):
            key = posixpath.normpath(posixpath.join(posixpath.dirname(self.key), path))
            if key not in (".", "..") and not key.startswith("../"):
                return self.store, key
            if isinstance(self.store, S3Store):  # leaves the store's prefix: still in its bucket
                path = f"s3://{self.store.bucket}/{posixpath.join(self.store.prefix, key)}"
            elif isinstance(self.store, LocalStore):
                path = str(self.store.base / key)
        if path.startswith("s3://"):
            bucket, _, key = path[len("s3://"):].partition("/")
            key = posixpath.normpath(key or ".").lstrip("/")
            if not bucket or key in (".", "..") or key.startswith("../"):
                raise ValueError(f"audio_filepath {audio_filepath!r} names no object of a bucket (s3://BUCKET/KEY)")
            return self._s3(bucket), key
        if path.startswith("file://"):
            parts = urlsplit(path)
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"audio_filepath {audio_filepath!r} is on another host; give a local file:// URI")
            path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(
                f"audio_filepath {audio_filepath!r} is not readable here: give a path (relative to the "
                "manifest, or absolute), a file:// URI or an s3:// URI"
            )
        key = posixpath.normpath(path).lstrip("/")
        if key == ".":
            raise ValueError(f"audio_filepath {audio_filepath!r} names a folder, not an audio file")
        return self._local(), key

    def audio_bytes(self, audio_filepath: str) -> bytes:
        store, key = self.locate(audio_filepath)
        return store.get_bytes(key)

    def audio_sha256(self, audio_filepath: str) -> str:
        return hashlib.sha256(self.audio_bytes(audio_filepath)).hexdigest()

    def derive_utt_id(self, audio_filepath: str) -> str:
        """:func:`derive_utt_id` of the audio's path relative to the manifest's folder when it lies
        there (however the record wrote it), else of its full location."""
        where = _location(*self.locate(audio_filepath))
        return derive_utt_id(where[len(self._folder):] if where.startswith(self._folder) else where)

    def _local(self) -> ObjectStore:
        if "/" not in self._stores:
            self._stores["/"] = open_store("/")
        return self._stores["/"]

    def _s3(self, bucket: str) -> ObjectStore:
        root = f"s3://{bucket}"
        if root not in self._stores:
            if isinstance(self.store, S3Store):  # the manifest's own endpoint and credentials
                self._stores[root] = S3Store(bucket, "", self.storage_config or StorageConfig(), self.store.client)
            else:
                self._stores[root] = open_store(root, self.storage_config)
        return self._stores[root]


def _location(store: ObjectStore, key: str) -> str:
    """A key's full location, unencoded: a filesystem path, or ``s3://bucket/key``."""
    if isinstance(store, LocalStore):
        return str(Path(store.root) / key) if key != "." else store.root
    return store.uri(key) if key != "." else store.root
