"""The current training pool, as read by the stages downstream of ingestion.

Ingestion writes ``state/pool/CURRENT`` (the current version id) and
``state/pool/{version}/manifest.jsonl`` (one utterance per line, NeMo-compatible).
Each line's ``audio_filepath`` is relative to the manifest's folder (normally
``../../audio/ab/abcd….wav`` -> ``state/audio/ab/abcd….wav``), or a ``file://`` /
``s3://`` URI inside the same store. This module resolves those paths to store keys
and rewrites them relative to another folder when a stage writes a derived manifest.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from pipeline.storage import ObjectStore, join

POOL_PREFIX = "state/pool"
REQUIRED_FIELDS = ("audio_filepath", "duration", "text", "utt_id", "sha256")


@dataclass(frozen=True)
class Pool:
    """One pool version: its manifest key and its rows (dicts, as written by ingestion)."""

    version: str
    manifest_key: str
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def audio_key(self, row: dict[str, Any], store: ObjectStore) -> str:
        """The store key of a row's audio."""
        return resolve_audio_key(row["audio_filepath"], posixpath.dirname(self.manifest_key), store)


def resolve_audio_key(audio_filepath: str, manifest_dir: str, store: ObjectStore) -> str:
    """Turn a manifest's ``audio_filepath`` into a key of ``store``; fail if it points elsewhere."""
    if "://" in audio_filepath:
        root_uri = store.uri("x")[:-1]  # the store's own URI prefix, e.g. file:///…/store/ or s3://b/p/
        if audio_filepath.startswith(root_uri):
            return audio_filepath[len(root_uri):]
        raise ValueError(
            f"audio {audio_filepath!r} is outside the store {root_uri!r}; "
            "the pool must reference audio inside its own store (re-run ingest)"
        )
    key = posixpath.normpath(join(manifest_dir, audio_filepath))
    if key.startswith("../") or key == ".." or key.startswith("/"):
        raise ValueError(f"audio path {audio_filepath!r} escapes the store root (manifest folder {manifest_dir!r})")
    return key


def relative_audio_path(audio_key: str, manifest_dir: str) -> str:
    """``audio_key`` written relative to a manifest stored in ``manifest_dir`` (both store keys)."""
    return posixpath.relpath(audio_key, manifest_dir)


def read_current_pool_version(store: ObjectStore) -> str:
    key = join(POOL_PREFIX, "CURRENT")
    if not store.exists(key):
        raise FileNotFoundError(f"no training pool at {store.uri(key)}: run the ingest stage first")
    version = store.get_text(key).strip()
    if not version:
        raise ValueError(f"{store.uri(key)} is empty: re-run the ingest stage")
    return version


def read_pool(store: ObjectStore, version: str | None = None) -> Pool:
    """Read a pool version (default: the current one) and check each row has the contract's fields."""
    version = version or read_current_pool_version(store)
    manifest_key = join(POOL_PREFIX, version, "manifest.jsonl")
    if not store.exists(manifest_key):
        raise FileNotFoundError(f"pool version {version!r} has no manifest at {store.uri(manifest_key)}")
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(store.get_text(manifest_key).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{store.uri(manifest_key)} line {lineno} is not JSON: {exc}") from None
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise ValueError(f"{store.uri(manifest_key)} line {lineno} lacks {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"pool version {version!r} is empty ({store.uri(manifest_key)})")
    return Pool(version=version, manifest_key=manifest_key, rows=rows)
