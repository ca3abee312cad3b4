"""The current training pool, as read by the stages downstream of ingestion.

Ingestion writes ``state/pool/CURRENT`` (the current version id) and
``state/pool/{version}/manifest.jsonl`` (:mod:`pipeline.data.manifest` records). Each
record's ``audio_filepath`` is relative to the manifest's folder (normally
``../../audio/ab/abcd….wav`` -> ``state/audio/ab/abcd….wav``); a ``file://``/``s3://``
URI is accepted when it points inside the same store.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data import manifest
from pipeline.data.manifest import Utterance
from pipeline.storage import ObjectStore, join

POOL_PREFIX = "state/pool"


@dataclass(frozen=True)
class Pool:
    """One pool version: its manifest key and its utterances."""

    version: str
    manifest_key: str
    utterances: list[Utterance]

    def __len__(self) -> int:
        return len(self.utterances)

    def audio_key(self, utt: Utterance, store: ObjectStore) -> str:
        """The store key of an utterance's audio; fails if it lies outside ``store``."""
        path = utt.audio_filepath
        if "://" in path:
            root_uri = store.uri("x")[:-1]  # the store's own URI prefix, e.g. file:///…/store/ or s3://b/p/
            if path.startswith(root_uri):
                return path[len(root_uri):]
            raise ValueError(
                f"audio {path!r} of utterance {utt.utt_id!r} is outside the store {store.root!r}; "
                "the pool must reference audio inside its own store (re-run ingest)"
            )
        return manifest.resolve_audio_key(self.manifest_key, path)


def read_current_pool_version(store: ObjectStore) -> str:
    key = join(POOL_PREFIX, "CURRENT")
    if not store.exists(key):
        raise FileNotFoundError(f"no training pool at {store.uri(key)}: run the ingest stage first")
    version = store.get_text(key).strip()
    if not version:
        raise ValueError(f"{store.uri(key)} is empty: re-run the ingest stage")
    return version


def read_pool(store: ObjectStore, version: str | None = None) -> Pool:
    """Read a pool version (default: the current one); a bad record raises naming its line."""
    version = version or read_current_pool_version(store)
    manifest_key = join(POOL_PREFIX, version, "manifest.jsonl")
    if not store.exists(manifest_key):
        raise FileNotFoundError(f"pool version {version!r} has no manifest at {store.uri(manifest_key)}")
    utterances = manifest.read_manifest(store, manifest_key)
    if not utterances:
        raise ValueError(f"pool version {version!r} is empty ({store.uri(manifest_key)})")
    return Pool(version=version, manifest_key=manifest_key, utterances=utterances)
