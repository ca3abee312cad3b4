"""The ingest rules: every check of an incoming manifest line is a pure function that
raises :class:`Rejected` with its :class:`Reason` (the reason code of the quarantine entry).

The stage (:mod:`pipeline.stages.ingest.stage`) applies them to each line of a drop in this
order: the line's text and JSON, its fields, the transcript, the utt_id, the audio path,
size and checksum, then the decoded audio (finite, duration, sample rate, loudness, and
the declared duration). A rejection is recorded as a :class:`QuarantineEntry`; the
duplicate rules consult a :class:`PoolIndex` of what the pool already holds.

A plain NeMo line (``audio_filepath``, ``duration``, ``text``) is valid: a missing speaker or
group is ``unknown``, a missing sha256 is not checked, and a missing utt_id is
:func:`drop_utt_id` (the drop id and the audio's path within the drop, so the audio path is
checked first for such a line).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from pipeline.data.audio import AudioDecodeError, decode_audio
from pipeline.data.manifest import UNKNOWN, Utterance, derive_utt_id
from pipeline.data.text import find_out_of_charset, normalize_text
from pipeline.storage import join

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_RESAMPLE_KERNEL",
    "IncomingRecord",
    "PoolIndex",
    "QuarantineEntry",
    "Reason",
    "Rejected",
    "check_audio_unique",
    "check_checksum",
    "check_duration_bounds",
    "check_duration_matches",
    "check_fields",
    "check_finite",
    "check_loudness",
    "check_sample_rate",
    "check_size",
    "check_utt_id_unique",
    "decode_line",
    "decode_record_audio",
    "drop_utt_id",
    "normalize_transcript",
    "parse_line",
    "parse_object",
    "resolve_drop_audio_key",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_KEY_BYTES = 1024  # S3's limit on a key; a longer one is refused by S3 (not "not found")
# The resampler's cost grows with the reduced ratio of the two rates: converting sr to the target
# builds a (target/g) x (sr/g) filter bank, g = gcd(sr, target). Standard rates stay below 12M
# elements (44056 -> 16000 Hz is the largest); an odd rate such as 96001 Hz would need 768M
# (~13 GB and a minute of CPU for one second of audio), so it is refused instead.
MAX_RESAMPLE_KERNEL = 1 << 24


class Reason(StrEnum):
    """Why a record was rejected (the ``reason`` of a quarantine entry)."""

    UNPARSEABLE = "unparseable"  # the line is not JSON, or not a JSON object
    MISSING_FIELD = "missing_field"  # a required field is absent, or a field has the wrong type/value
    BAD_TEXT = "bad_text"  # invalid UTF-8, or a transcript empty/outside CHARSET after normalization
    PATH_ESCAPE = "path_escape"  # audio_filepath leaves the drop: '..', a path or URI outside its folder
    MISSING_AUDIO = "missing_audio"  # the named audio object does not exist
    TOO_LARGE = "too_large"  # audio bytes above ingest.max_audio_bytes
    CHECKSUM_MISMATCH = "checksum_mismatch"  # the manifest's sha256 differs from the audio bytes'
    DUPLICATE_UTT_ID = "duplicate_utt_id"  # utt_id already accepted (pool or earlier in the drop)
    DUPLICATE_AUDIO = "duplicate_audio"  # same audio bytes as an accepted record
    UNDECODABLE = "undecodable"  # libsndfile cannot decode the bytes
    NON_FINITE = "non_finite"  # NaN or infinite samples
    TOO_SHORT = "too_short"  # decoded duration below ingest.min_duration_s
    TOO_LONG = "too_long"  # decoded duration above ingest.max_duration_s
    SILENT = "silent"  # RMS below ingest.silence_floor_dbfs
    DURATION_MISMATCH = "duration_mismatch"  # decoded vs declared duration beyond the tolerance
    UNSUPPORTED_SAMPLE_RATE = "unsupported_sample_rate"  # a rate the resampler cannot convert at bounded cost


class Rejected(Exception):
    """A record breaks a rule; carries the reason code, a human message and, for duplicates, the original."""

    def __init__(self, reason: Reason, message: str, duplicate_of: dict[str, str | None] | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.duplicate_of = duplicate_of


@dataclass(frozen=True)
class IncomingRecord:
    """The type-checked fields of one incoming manifest line (text not yet normalized; ``utt_id``
    and ``sha256`` ``None`` when the line has none)."""

    utt_id: str | None
    audio_filepath: str
    duration: float
    text: str
    speaker: str
    group: str
    sha256: str | None = None


@dataclass(frozen=True)
class QuarantineEntry:
    """One rejected line of a drop."""

    drop: str
    line: int
    utt_id: str | None
    reason: Reason
    message: str
    duplicate_of: dict[str, str | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "drop": self.drop,
            "line": self.line,
            "utt_id": self.utt_id,
            "reason": str(self.reason),
            "message": self.message,
        }
        if self.duplicate_of is not None:
            entry["duplicate_of"] = self.duplicate_of
        return entry

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> "QuarantineEntry":
        return cls(
            drop=entry["drop"],
            line=int(entry["line"]),
            utt_id=entry.get("utt_id"),
            reason=Reason(entry["reason"]),
            message=entry["message"],
            duplicate_of=entry.get("duplicate_of"),
        )


@dataclass
class PoolIndex:
    """What the pool already holds, for the duplicate rules: utt_id -> drop, sha256 -> (utt_id, drop)."""

    by_utt_id: dict[str, str | None] = field(default_factory=dict)
    by_sha256: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    @classmethod
    def build(cls, utterances: Iterable[Utterance]) -> "PoolIndex":
        index = cls()
        for utt in utterances:
            index.add(utt)
        return index

    def add(self, utt: Utterance) -> None:
        self.by_utt_id[utt.utt_id] = utt.drop
        self.by_sha256.setdefault(utt.sha256, (utt.utt_id, utt.drop))


# --------------------------------------------------------------------------- rules (pure)


def decode_line(raw: bytes) -> str:
    """The line as text; ``bad_text`` if it is not valid UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise Rejected(Reason.BAD_TEXT, f"line is not valid UTF-8 (byte 0x{bad} at offset {exc.start})") from None


def parse_object(line: str) -> dict[str, Any]:
    """The line as a JSON object; ``unparseable`` otherwise (also for JSON the parser refuses to build:
    nesting deeper than the recursion limit, integers of more than 4300 digits)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        snippet = line.strip()[:60]
        raise Rejected(Reason.UNPARSEABLE, f"line is not JSON ({exc.msg} at column {exc.colno}): {snippet!r}") from None
    except RecursionError:
        raise Rejected(Reason.UNPARSEABLE, "line is JSON nested too deeply to parse") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise Rejected(Reason.UNPARSEABLE, f"line is JSON that cannot be parsed: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise Rejected(Reason.UNPARSEABLE, f"line is JSON but not an object (got {type(value).__name__})")
    return value


def parse_line(raw: bytes) -> tuple[dict[str, Any], Rejected | None]:
    """The JSON object of a line, and a ``bad_text`` rejection if the line is not valid UTF-8.

    A line with invalid UTF-8 is still parsed (with replacement characters) so its
    utt_id can be reported; if it does not parse at all it is ``unparseable``.
    """
    try:
        return parse_object(decode_line(raw)), None
    except Rejected as rej:
        if rej.reason is not Reason.BAD_TEXT:
            raise
        return parse_object(raw.decode("utf-8", errors="replace")), rej


def _check_utf8(name: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(Reason.BAD_TEXT, f"field {name!r} is not valid UTF-8 (unpaired surrogate escape)") from None
    return value


def check_fields(record: Mapping[str, Any]) -> IncomingRecord:
    """Fields present and typed; ``missing_field`` (or ``bad_text`` for invalid UTF-8) otherwise.

    ``audio_filepath``, ``duration`` and ``text`` are required (what NeMo writes); ``utt_id``,
    ``speaker``, ``group`` and ``sha256`` are optional, but must be valid when given. A missing
    (or null) speaker or group is ``unknown``.
    """
    values: dict[str, Any] = {}
    for name in ("utt_id", "audio_filepath", "text", "speaker", "group"):
        value = record.get(name)
        if value is None:
            if name in ("audio_filepath", "text"):
                raise Rejected(Reason.MISSING_FIELD, f"required field {name!r} is missing")
            values[name] = None if name == "utt_id" else UNKNOWN
            continue
        if not isinstance(value, str) or (name != "text" and not value.strip()):
            raise Rejected(Reason.MISSING_FIELD, f"field {name!r} must be a non-empty string, got {value!r}")
        values[name] = _check_utf8(name, value)
    duration = record.get("duration")
    if duration is None:
        raise Rejected(Reason.MISSING_FIELD, "required field 'duration' is missing")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not _finite(duration):
        shown = repr(duration) if len(repr(duration)) <= 60 else repr(duration)[:60] + "..."
        raise Rejected(Reason.MISSING_FIELD, f"field 'duration' must be a finite number of seconds, got {shown}")
    sha = record.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha.lower())):
        raise Rejected(Reason.MISSING_FIELD, f"field 'sha256' must be 64 hex digits when given, got {sha!r}")
    return IncomingRecord(duration=float(duration), sha256=sha.lower() if sha else None, **values)


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def normalize_transcript(text: str) -> str:
    """The normalized transcript; ``bad_text`` if it is empty or has characters outside the model's CHARSET."""
    normalized = normalize_text(text)
    if not normalized:
        raise Rejected(Reason.BAD_TEXT, f"transcript {text!r} is empty after normalization")
    foreign = find_out_of_charset(normalized)
    if foreign:
        raise Rejected(
            Reason.BAD_TEXT,
            f"transcript {normalized!r} has characters outside the vocabulary: {''.join(sorted(foreign))!r}",
        )
    return normalized


def check_utt_id_unique(utt_id: str, accepted: Mapping[str, str | None]) -> None:
    """``duplicate_utt_id`` if ``utt_id`` was already accepted (``accepted``: utt_id -> drop)."""
    if utt_id in accepted:
        drop = accepted[utt_id]
        raise Rejected(
            Reason.DUPLICATE_UTT_ID,
            f"utt_id {utt_id!r} was already accepted from drop {drop!r}",
            duplicate_of={"utt_id": utt_id, "drop": drop},
        )


def resolve_drop_audio_key(audio_filepath: str, drop_prefix: str, drop_uri: str) -> str:
    """The store key of a record's audio, which must lie inside its drop; ``path_escape`` otherwise.

    ``audio_filepath`` is relative to the drop folder ``drop_prefix`` (``incoming/{drop_id}``),
    or a URI beginning with ``drop_uri`` (the drop folder's own URI, ending with ``/``). In a
    local store it may also be an absolute path or ``file://`` URI inside the drop's folder
    (what NeMo writes for its own files); anything outside that folder escapes.
    """
    rel = _within_drop(audio_filepath, drop_uri)
    if rel.startswith("/"):
        raise Rejected(
            Reason.PATH_ESCAPE, f"audio_filepath {audio_filepath!r} is absolute; use a path relative to the drop"
        )
    parts = [p for p in rel.split("/") if p != "."]
    if ".." in parts:
        raise Rejected(Reason.PATH_ESCAPE, f"audio_filepath {audio_filepath!r} contains '..'")
    if not parts or "" in parts or _CONTROL.search(rel):
        shown = audio_filepath if len(audio_filepath) <= 200 else audio_filepath[:200] + "..."
        raise Rejected(Reason.PATH_ESCAPE, f"audio_filepath {shown!r} is not a clean relative path")
    key = join(drop_prefix, *parts)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise Rejected(
            Reason.PATH_ESCAPE,
            f"audio_filepath {audio_filepath[:80]!r}... is {len(audio_filepath)} characters long: "
            f"its key would exceed {MAX_KEY_BYTES} bytes",
        )
    return key


def _within_drop(audio_filepath: str, drop_uri: str) -> str:
    """``audio_filepath`` relative to the drop folder; an absolute path or URI must lie inside it."""
    path = audio_filepath
    folder = unquote(urlsplit(drop_uri).path) if drop_uri.startswith("file://") else None  # a local drop
    if path.startswith("file://"):
        netloc = urlsplit(path).netloc
        if netloc not in ("", "localhost"):
            raise Rejected(Reason.PATH_ESCAPE, f"audio_filepath {audio_filepath!r} is on another host ({netloc})")
        path = unquote(urlsplit(path).path)
    elif "://" in path:
        if not path.startswith(drop_uri):
            raise Rejected(
                Reason.PATH_ESCAPE, f"audio_filepath {audio_filepath!r} points outside this drop ({drop_uri})"
            )
        return path[len(drop_uri) :]
    if not path.startswith("/"):
        return path
    if folder is None:
        raise Rejected(
            Reason.PATH_ESCAPE,
            f"audio_filepath {audio_filepath!r} is a local path, but this drop is {drop_uri}: "
            "use a path relative to the drop, or a URI inside it",
        )
    if not path.startswith(folder):
        raise Rejected(
            Reason.PATH_ESCAPE,
            f"audio_filepath {audio_filepath!r} is outside this drop's folder {folder}: "
            "audio must lie inside the drop",
        )
    return path[len(folder) :]


def drop_utt_id(audio_filepath: str, drop_id: str, drop_prefix: str, drop_uri: str) -> str:
    """The utt_id of a line that has none: ``{drop_id}:`` + its audio's path within the drop
    (:func:`~pipeline.data.manifest.derive_utt_id`), the same however the path is written;
    ``path_escape`` when the path leaves the drop."""
    key = resolve_drop_audio_key(audio_filepath, drop_prefix, drop_uri)
    return derive_utt_id(key[len(drop_prefix.rstrip("/")) + 1 :], drop_id)


def check_size(size: int, max_bytes: int) -> None:
    """``too_large`` above ``max_bytes``."""
    if size > max_bytes:
        raise Rejected(Reason.TOO_LARGE, f"audio is {size} bytes, above ingest.max_audio_bytes={max_bytes}")


def check_checksum(declared: str | None, actual: str) -> None:
    """``checksum_mismatch`` when the manifest names a sha256 that the audio bytes do not have."""
    if declared is not None and declared != actual:
        raise Rejected(
            Reason.CHECKSUM_MISMATCH,
            f"manifest sha256 {declared[:12]}... differs from the audio's {actual[:12]}... "
            "(truncated or replaced upload?)",
        )


def check_audio_unique(sha256: str, accepted: Mapping[str, tuple[str, str | None]]) -> None:
    """``duplicate_audio`` if the same audio bytes were already accepted (sha256 -> (utt_id, drop))."""
    if sha256 in accepted:
        utt_id, drop = accepted[sha256]
        raise Rejected(
            Reason.DUPLICATE_AUDIO,
            f"same audio bytes (sha256 {sha256[:12]}...) as utt {utt_id!r} accepted from drop {drop!r}",
            duplicate_of={"utt_id": utt_id, "drop": drop},
        )


def decode_record_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decoded ``([channels, samples], sample_rate)``; ``undecodable`` otherwise."""
    try:
        return decode_audio(data)
    except AudioDecodeError as exc:
        raise Rejected(Reason.UNDECODABLE, str(exc)) from None


def check_finite(wave: np.ndarray) -> None:
    """``non_finite`` if any sample is NaN or infinite."""
    finite = np.isfinite(wave)
    if not finite.all():
        raise Rejected(Reason.NON_FINITE, f"audio holds {int((~finite).sum())} NaN/infinite samples")


def check_duration_bounds(seconds: float, min_s: float, max_s: float) -> None:
    """``too_short``/``too_long`` outside ``[min_s, max_s]``."""
    if seconds < min_s:
        raise Rejected(Reason.TOO_SHORT, f"audio lasts {seconds:.3f} s, below ingest.min_duration_s={min_s}")
    if seconds > max_s:
        raise Rejected(Reason.TOO_LONG, f"audio lasts {seconds:.3f} s, above ingest.max_duration_s={max_s}")


def check_sample_rate(sample_rate: int, target_rate: int, max_kernel: int = MAX_RESAMPLE_KERNEL) -> None:
    """``unsupported_sample_rate`` when converting ``sample_rate`` to ``target_rate`` would need a
    resampling filter bank of more than ``max_kernel`` elements (an odd rate with a large reduced ratio)."""
    if sample_rate == target_rate:
        return
    g = math.gcd(sample_rate, target_rate)
    if (sample_rate // g) * (target_rate // g) > max_kernel:
        raise Rejected(
            Reason.UNSUPPORTED_SAMPLE_RATE,
            f"sample rate {sample_rate} Hz cannot be converted to {target_rate} Hz at a bounded cost "
            f"(reduced ratio {sample_rate // g}:{target_rate // g}); re-encode at a standard rate "
            "such as 8000, 16000, 22050, 44100 or 48000 Hz",
        )


def check_loudness(dbfs: float, floor_dbfs: float) -> None:
    """``silent`` when the RMS level is below ``floor_dbfs``."""
    if not dbfs >= floor_dbfs:
        shown = "-inf" if dbfs == -math.inf else f"{dbfs:.1f}"
        raise Rejected(Reason.SILENT, f"audio RMS is {shown} dBFS, below ingest.silence_floor_dbfs={floor_dbfs}")


def check_duration_matches(decoded_s: float, declared_s: float, tolerance_s: float) -> None:
    """``duration_mismatch`` when decoded and declared durations differ by more than ``tolerance_s``."""
    if abs(decoded_s - declared_s) > tolerance_s:
        raise Rejected(
            Reason.DURATION_MISMATCH,
            f"audio lasts {decoded_s:.3f} s but the manifest says {declared_s:.3f} s "
            f"(tolerance ingest.duration_tolerance_s={tolerance_s})",
        )
