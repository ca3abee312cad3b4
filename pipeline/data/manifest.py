"""Utterance manifests: NeMo-compatible JSON Lines, one utterance per line.

A line looks like ``{"audio_filepath": "../../audio/ab/abcd....wav", "duration": 2.41,
"group": "USA/neutral", "sha256": "abcd...", "speaker": "jackson", "text": "seven three
one", "utt_id": "..."}`` (keys sorted, UTF-8, ``\\n`` after every line), plus ``drop`` in
the training pool. ``audio_filepath`` is relative to the manifest's folder, or a
``file://``/``s3://`` URI. Unknown keys are ignored on reading (NeMo tools add some).
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.storage import ObjectStore

__all__ = [
    "ManifestError",
    "Utterance",
    "dumps_manifest",
    "parse_manifest",
    "read_manifest",
    "relative_audio_path",
    "resolve_audio_key",
    "write_manifest",
]


class ManifestError(ValueError):
    """A manifest line is not a valid utterance; the message names the line and field."""


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


def dumps_manifest(utterances: Iterable[Utterance]) -> bytes:
    """Serialize to JSON Lines bytes: sorted keys, UTF-8, one ``\\n``-terminated line each."""
    lines = [json.dumps(u.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for u in utterances]
    return "".join(lines).encode("utf-8")


def parse_manifest(data: bytes, source: str = "<manifest>") -> list[Utterance]:
    """Parse a trusted manifest (e.g. the pool); blank lines are skipped, anything else invalid raises."""
    out: list[Utterance] = []
    for number, raw in enumerate(data.decode("utf-8").split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ManifestError(f"expected a JSON object, got {type(record).__name__}")
            out.append(Utterance.from_dict(record))
        except (json.JSONDecodeError, ManifestError) as exc:
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
