"""Ingest stage: validate new incoming drops into the accepted pool or the quarantine.

Producers upload a drop as ``incoming/{drop_id}/`` holding its audio and, **last**,
``manifest.jsonl``: the manifest is the drop's completion marker. A drop folder without
a manifest is left for a later run and reported in ``pending_drops``.

A run takes every drop that is not yet in the ledger (membership, not name order, so a late
drop with an older name is still taken), in drop-id order, and checks each record with the
rules of :mod:`pipeline.stages.ingest.rules` (each a small pure function raising ``Rejected``
with a ``Reason``; a plain NeMo line, only ``audio_filepath``/``duration``/``text``, gets its
defaults and derived utt_id there). Accepted audio is downmixed and resampled to
``audio.sample_rate`` and stored once, content-addressed by the sha256 of the original bytes.

On-store layout (keys relative to the store root)::

    incoming/{drop_id}/manifest.jsonl       producers' drops (read only)
    state/audio/{sha[:2]}/{sha}.wav         accepted audio, 16-bit mono WAV at audio.sample_rate
    state/pool/{version}/manifest.jsonl     cumulative pool, sorted by utt_id; version = sha256(bytes)[:16]
    state/pool/{version}/lineage.json       parent version, run id and drops that made this version
    state/pool/CURRENT                      the current pool version (follows the ledger)
    state/quarantine/{drop_id}.jsonl        every rejected line of a drop
    state/ingest/ledger.json                {"pool_version": ..., "drops": {drop_id: {...}}}
    runs/{run_id}/ingest/quarantine.jsonl   rejected lines of the drops this run took
    runs/{run_id}/ingest/_SUCCESS           the summary (written by RunContext.run_stage)

Commit order: audio, pool version, quarantine files, then the ledger (the single commit
point: it names the drops taken *and* the pool version they produced), then ``CURRENT``.
A crash before the ledger write leaves the ledger unchanged, so a retry redoes the drops
(audio and pool writes are content-addressed, so rewriting them is harmless). A crash
between the ledger and ``CURRENT`` is repaired by the next run, which trusts the ledger.
A retry of a run whose ledger commit had already happened reports those drops again from
the ledger and the quarantine files, so its summary is the same as the first attempt's.

Blank (whitespace-only) manifest lines are skipped and not counted in ``lines_read``;
line numbers are physical, 1-based, blank lines included, so they match an editor.
Lines that are not a JSON object count as ``unparseable_lines``: they are written to the
quarantine files but are not part of the summary's ``quarantined`` list. The stage checks
``accepted + len(quarantined) + unparseable_lines == lines_read`` and raises otherwise.

Concurrency: one ingest at a time (the ledger is read-modify-written without a lock).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from tqdm import tqdm

from pipeline.config import IngestConfig
from pipeline.data.audio import encode_wav, rms_dbfs, to_mono_resampled
from pipeline.data.manifest import Utterance, dumps_manifest, parse_manifest, relative_audio_path
from pipeline.run import RUN_ID_RE, RunContext
from pipeline.stages.ingest.rules import (
    PoolIndex,
    QuarantineEntry,
    Reason,
    Rejected,
    check_audio_unique,
    check_checksum,
    check_duration_bounds,
    check_duration_matches,
    check_fields,
    check_finite,
    check_loudness,
    check_sample_rate,
    check_size,
    check_utt_id_unique,
    decode_record_audio,
    drop_utt_id,
    normalize_transcript,
    parse_line,
    resolve_drop_audio_key,
)
from pipeline.storage import ObjectNotFound, ObjectStore, join

__all__ = [
    "STAGE",
    "DropResult",
    "IngestError",
    "Ledger",
    "discover_drops",
    "fetch_audio",
    "ingest",
    "read_ledger",
]

log = logging.getLogger(__name__)

STAGE = "ingest"
INCOMING = "incoming"
MANIFEST = "manifest.jsonl"
LEDGER_FORMAT = 1


class IngestError(RuntimeError):
    """The stage cannot proceed safely (corrupt ledger, broken invariant); the message says what to do."""


@dataclass
class DropResult:
    """What one drop yielded."""

    drop_id: str
    manifest_sha256: str
    lines_read: int = 0
    accepted: list[Utterance] = field(default_factory=list)
    rejected: list[QuarantineEntry] = field(default_factory=list)

    @property
    def unparseable_lines(self) -> int:
        return sum(1 for e in self.rejected if e.reason is Reason.UNPARSEABLE)

    @property
    def quarantined(self) -> list[QuarantineEntry]:
        """Rejected records, unparseable lines excepted (those are only counted)."""
        return [e for e in self.rejected if e.reason is not Reason.UNPARSEABLE]

    def counts(self) -> dict[str, int]:
        return {
            "lines_read": self.lines_read,
            "accepted": len(self.accepted),
            "quarantined": len(self.quarantined),
            "unparseable_lines": self.unparseable_lines,
        }


@dataclass
class Ledger:
    """The drops taken so far and the pool version they produced (``state/ingest/ledger.json``)."""

    pool_version: str | None = None
    drops: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        body = {"format": LEDGER_FORMAT, "pool_version": self.pool_version, "drops": self.drops}
        return json.dumps(body, indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------- keys


def ledger_key(ctx: RunContext) -> str:
    return ctx.state_key("ingest", "ledger.json")


def pool_manifest_key(ctx: RunContext, version: str) -> str:
    return ctx.state_key("pool", version, MANIFEST)


def current_pool_key(ctx: RunContext) -> str:
    return ctx.state_key("pool", "CURRENT")


def audio_key(ctx: RunContext, sha256: str) -> str:
    return ctx.state_key("audio", sha256[:2], f"{sha256}.wav")


def drop_quarantine_key(ctx: RunContext, drop_id: str) -> str:
    return ctx.state_key("quarantine", f"{drop_id}.jsonl")


def run_quarantine_key(ctx: RunContext) -> str:
    return ctx.stage_key(STAGE, "quarantine.jsonl")


# --------------------------------------------------------------------------- store I/O


def read_ledger(ctx: RunContext) -> Ledger:
    """The ledger, or an empty one on the first run; a corrupt ledger raises :class:`IngestError`."""
    store, key = ctx.store, ledger_key(ctx)
    try:
        raw = store.get_text(key)
    except ObjectNotFound:
        if store.exists(current_pool_key(ctx)):
            raise IngestError(
                f"{store.uri(current_pool_key(ctx))} exists but {store.uri(key)} does not: "
                "restore the ledger (or remove the stray pool) before ingesting"
            ) from None
        return Ledger()
    try:
        body = json.loads(raw)
        if body.get("format") != LEDGER_FORMAT or not isinstance(body.get("drops"), dict):
            raise ValueError(f"unexpected format {body.get('format')!r}")
        return Ledger(pool_version=body.get("pool_version"), drops=body["drops"])
    except (ValueError, AttributeError) as exc:
        raise IngestError(f"ingest ledger {store.uri(key)} is corrupt ({exc}); restore it from a backup") from None


def discover_drops(store: ObjectStore, taken: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """``(new, pending, ignored)`` drop ids under ``incoming/`` not in ``taken``.

    New drops have a manifest; pending ones do not (yet); ignored ones have names that
    cannot be used as ids (they are logged).
    """
    new, pending, ignored = [], [], []
    for drop_id in store.list_dirs(INCOMING):
        if drop_id in taken:
            continue
        if not RUN_ID_RE.match(drop_id):
            log.warning("ignoring incoming folder %r: drop ids are letters, digits and _.:+-", drop_id)
            ignored.append(drop_id)
        elif store.exists(join(INCOMING, drop_id, MANIFEST)):
            new.append(drop_id)
        else:
            pending.append(drop_id)
    return new, pending, ignored


def _read_capped(stream: IO[bytes], limit: int) -> bytes:
    chunks, total = [], 0
    while total <= limit:
        chunk = stream.read(min(1 << 20, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def fetch_audio(store: ObjectStore, key: str, max_bytes: int) -> bytes:
    """The audio bytes at ``key``: ``missing_audio``/``too_large`` rejections; other storage errors raise."""
    try:
        check_size(store.size(key), max_bytes)
        with store.open_read(key) as stream:
            data = _read_capped(stream, max_bytes)
    except ObjectNotFound:
        raise Rejected(Reason.MISSING_AUDIO, f"audio {store.uri(key)} does not exist") from None
    check_size(len(data), max_bytes)
    return data


def _read_manifest_lines(store: ObjectStore, key: str) -> tuple[list[tuple[int, bytes]], str]:
    """Non-blank ``(line number, bytes)`` of a drop manifest, and the sha256 of its bytes."""
    with store.open_read(key) as stream:
        data = stream.read()
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            lines.append((number, raw.rstrip(b"\r")))
    return lines, hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the stage


class _DropIngester:
    """Applies the rules to the lines of one drop and stores accepted audio."""

    def __init__(self, ctx: RunContext, index: PoolIndex, pool_manifest_template: str):
        self.ctx = ctx
        self.store = ctx.store
        self.rules: IngestConfig = ctx.config.ingest
        self.sample_rate = ctx.config.audio.sample_rate
        self.index = index
        self.pool_manifest_template = pool_manifest_template

    def ingest_drop(self, drop_id: str, lines: list[tuple[int, bytes]], manifest_sha: str, bar: tqdm) -> DropResult:
        result = DropResult(drop_id=drop_id, manifest_sha256=manifest_sha)
        prefix = join(INCOMING, drop_id)
        drop_uri = self.store.uri(join(prefix, MANIFEST))[: -len(MANIFEST)]
        for number, raw in lines:
            result.lines_read += 1
            utt_id: str | None = None
            try:
                record, bad_utf8 = parse_line(raw)
                utt_id = _line_utt_id(record, drop_id, prefix, drop_uri)
                if bad_utf8 is not None:
                    raise bad_utf8
                utt = self._validate(record, drop_id, prefix, drop_uri)
            except Rejected as rej:
                result.rejected.append(
                    QuarantineEntry(drop_id, number, utt_id, rej.reason, rej.message, rej.duplicate_of)
                )
            else:
                self.index.add(utt)
                result.accepted.append(utt)
            bar.update(1)
        return result

    def _validate(self, record: dict[str, Any], drop_id: str, prefix: str, drop_uri: str) -> Utterance:
        fields = check_fields(record)
        text = normalize_transcript(fields.text)
        utt_id = fields.utt_id or drop_utt_id(fields.audio_filepath, drop_id, prefix, drop_uri)
        check_utt_id_unique(utt_id, self.index.by_utt_id)
        key = resolve_drop_audio_key(fields.audio_filepath, prefix, drop_uri)
        data = fetch_audio(self.store, key, self.rules.max_audio_bytes)
        sha = hashlib.sha256(data).hexdigest()
        check_checksum(fields.sha256, sha)
        check_audio_unique(sha, self.index.by_sha256)
        wave, sr = decode_record_audio(data)
        check_finite(wave)
        check_duration_bounds(wave.shape[1] / sr, self.rules.min_duration_s, self.rules.max_duration_s)
        check_sample_rate(sr, self.sample_rate)
        mono = to_mono_resampled(wave, sr, self.sample_rate)
        check_loudness(rms_dbfs(mono), self.rules.silence_floor_dbfs)
        check_duration_matches(wave.shape[1] / sr, fields.duration, self.rules.duration_tolerance_s)
        stored = audio_key(self.ctx, sha)
        if not self.store.exists(stored):
            self.store.put_bytes(stored, encode_wav(mono, self.sample_rate))
        return Utterance(
            audio_filepath=relative_audio_path(self.pool_manifest_template, stored),
            duration=round(mono.numel() / self.sample_rate, 4),
            text=text,
            speaker=fields.speaker,
            group=fields.group,
            utt_id=utt_id,
            sha256=sha,
            drop=drop_id,
        )


def _line_utt_id(record: Mapping[str, Any], drop_id: str, prefix: str, drop_uri: str) -> str | None:
    """The utt_id a quarantine entry names: the line's own, else the derived one (None if underivable)."""
    value, path = record.get("utt_id"), record.get("audio_filepath")
    if value is not None or not isinstance(path, str):
        return value if isinstance(value, str) else None
    try:
        return drop_utt_id(path, drop_id, prefix, drop_uri)
    except Rejected:
        return None


def _write_jsonl(store: ObjectStore, key: str, rows: Iterable[Mapping[str, Any]]) -> None:
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    store.put_bytes(key, data.encode("utf-8"))


def _read_quarantine(store: ObjectStore, key: str) -> list[QuarantineEntry]:
    text = store.get_text(key)
    return [QuarantineEntry.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]


def _load_pool(ctx: RunContext, version: str | None) -> list[Utterance]:
    if version is None:
        return []
    key = pool_manifest_key(ctx, version)
    try:
        return parse_manifest(ctx.store.get_bytes(key), source=ctx.store.uri(key))
    except ObjectNotFound:
        raise IngestError(
            f"the ledger names pool version {version} but {ctx.store.uri(key)} is missing; restore it from a backup"
        ) from None


def _reload_committed(ctx: RunContext, ledger: Ledger, drop_id: str, pool: list[Utterance]) -> DropResult:
    """A drop this run already committed (a retry after the ledger write), rebuilt from the store."""
    entry = ledger.drops[drop_id]
    result = DropResult(drop_id=drop_id, manifest_sha256=entry["manifest_sha256"])
    result.lines_read = int(entry["counts"]["lines_read"])
    result.accepted = [u for u in pool if u.drop == drop_id]
    result.rejected = _read_quarantine(ctx.store, drop_quarantine_key(ctx, drop_id))
    return result


def _commit(ctx: RunContext, ledger: Ledger, pool: list[Utterance], taken: list[DropResult]) -> tuple[str | None, int]:
    """Write the new pool version, quarantine files, ledger and CURRENT, in that order."""
    store = ctx.store
    new = [u for r in taken for u in r.accepted]
    version = ledger.pool_version
    size = len(pool)
    if new:
        merged = sorted(pool + new, key=lambda u: u.utt_id)
        data = dumps_manifest(merged)
        version = hashlib.sha256(data).hexdigest()[:16]
        size = len(merged)
        store.put_bytes(pool_manifest_key(ctx, version), data)
        lineage = {
            "version": version,
            "parent": ledger.pool_version,
            "run_id": ctx.run_id,
            "drops_added": [r.drop_id for r in taken if r.accepted],
            "size": size,
        }
        store.put_text(ctx.state_key("pool", version, "lineage.json"), json.dumps(lineage, indent=2, sort_keys=True))
    for result in taken:
        _write_jsonl(store, drop_quarantine_key(ctx, result.drop_id), (e.to_dict() for e in result.rejected))
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    for result in taken:
        ledger.drops[result.drop_id] = {
            "run_id": ctx.run_id,
            "pool_version": version,
            "manifest_sha256": result.manifest_sha256,
            "counts": result.counts(),
            "ingested_at": now,
        }
    ledger.pool_version = version
    store.put_text(ledger_key(ctx), ledger.to_json())  # the commit point
    if version is not None:
        store.put_text(current_pool_key(ctx), version + "\n")
    return version, size


def _repair_current(ctx: RunContext, ledger: Ledger) -> None:
    """Make CURRENT follow the ledger (a crash between the two writes leaves it behind)."""
    if ledger.pool_version is None:
        return
    key = current_pool_key(ctx)
    try:
        current = ctx.store.get_text(key).strip()
    except ObjectNotFound:
        current = None
    if current != ledger.pool_version:
        log.warning("pool CURRENT was %s, the ledger says %s: repairing", current, ledger.pool_version)
        ctx.store.put_text(key, ledger.pool_version + "\n")


def _check_invariant(lines_read: int, accepted: int, quarantined: int, unparseable: int, where: str) -> None:
    if accepted + quarantined + unparseable != lines_read:
        raise IngestError(
            f"ingest invariant broken for {where}: accepted {accepted} + quarantined {quarantined} "
            f"+ unparseable {unparseable} != lines read {lines_read}; this is a bug, nothing was committed"
        )


def _ingest_body(ctx: RunContext, progress: bool) -> dict[str, Any]:
    store = ctx.store
    ledger = read_ledger(ctx)
    _repair_current(ctx, ledger)
    pool = _load_pool(ctx, ledger.pool_version)
    # a retry of this run after its ledger commit: report those drops again, do not retake them
    resumed = [
        _reload_committed(ctx, ledger, drop_id, pool)
        for drop_id, entry in sorted(ledger.drops.items())
        if entry.get("run_id") == ctx.run_id
    ]
    new_ids, pending, ignored = discover_drops(store, ledger.drops)

    manifests = {d: _read_manifest_lines(store, join(INCOMING, d, MANIFEST)) for d in new_ids}
    total = sum(len(lines) for lines, _ in manifests.values())
    ingester = _DropIngester(ctx, PoolIndex.build(pool), pool_manifest_key(ctx, "version"))
    taken: list[DropResult] = []
    with tqdm(total=total, desc="ingest", unit="utt", file=sys.stderr, disable=not progress) as bar:
        for drop_id in new_ids:
            lines, sha = manifests[drop_id]
            bar.set_postfix_str(drop_id)
            taken.append(ingester.ingest_drop(drop_id, lines, sha, bar))

    for result in taken:
        c = result.counts()
        where = f"drop {result.drop_id}"
        _check_invariant(c["lines_read"], c["accepted"], c["quarantined"], c["unparseable_lines"], where)
        log.info("drop %s: %s", result.drop_id, c)

    results = resumed + taken
    rejected = [e for r in results for e in r.rejected]
    _write_jsonl(store, run_quarantine_key(ctx), (e.to_dict() for e in rejected))
    if taken:
        version, size = _commit(ctx, ledger, pool, taken)
    else:
        version, size = ledger.pool_version, len(pool)

    summary = _summarize(results, version, size, pending, ignored)
    summary["pool_manifest"] = store.uri(pool_manifest_key(ctx, version)) if version else None
    summary["quarantine_uri"] = store.uri(run_quarantine_key(ctx))
    _check_invariant(
        summary["lines_read"], summary["accepted"], len(summary["quarantined"]), summary["unparseable_lines"], "the run"
    )
    return summary


def _summarize(
    results: list[DropResult], version: str | None, size: int, pending: list[str], ignored: list[str]
) -> dict[str, Any]:
    quarantined = [e for r in results for e in r.quarantined]
    reasons = Counter(str(e.reason) for r in results for e in r.rejected)
    return {
        "lines_read": sum(r.lines_read for r in results),
        "accepted": sum(len(r.accepted) for r in results),
        "quarantined": [e.to_dict() for e in quarantined],
        "unparseable_lines": sum(r.unparseable_lines for r in results),
        "reasons": dict(sorted(reasons.items())),
        "drops": sorted(r.drop_id for r in results),
        "pending_drops": pending,
        "ignored_drops": ignored,
        "pool_version": version,
        "pool_size": size,
    }


def ingest(ctx: RunContext, *, progress: bool = True) -> dict[str, Any]:
    """Take every new drop under ``incoming/`` into the pool or the quarantine (a run-scoped transaction).

    Returns the summary also stored in ``runs/{run_id}/ingest/_SUCCESS``: ``lines_read``,
    ``accepted``, ``quarantined`` (list of ``{drop, line, utt_id, reason, message[,
    duplicate_of]}``), ``unparseable_lines``, ``reasons`` (count per reason code),
    ``drops``, ``pending_drops``, ``ignored_drops``, ``pool_version``, ``pool_size``,
    ``pool_manifest`` and ``quarantine_uri`` (URIs), plus ``run_id``/``stage``/``skipped``.
    A storage failure raises :class:`~pipeline.storage.StorageError` naming the key and
    leaves the ledger unchanged.
    """
    return ctx.run_stage(STAGE, lambda: _ingest_body(ctx, progress))
