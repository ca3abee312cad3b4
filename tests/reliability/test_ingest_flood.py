"""Reliability scenario 7 (first half): a hostile drop at 10x the normal volume.

One drop of 400 records (10x the 40 utterances a week of the end-to-end DAG test) goes
through the real ingest stage against moto's S3 server: valid records in many formats
(mono/stereo, 8 to 48 kHz, WAV/FLAC, drop-URI and ``./`` paths, declared checksums in
upper case, CRLF line ends, blank lines) mixed with every defect the ingestion rules know.
The defects come from :data:`DEFECTS`, one list of variants per reason code of
:class:`pipeline.stages.ingest.rules.Reason`: a reason code without variants fails the test, so a new
rule cannot go untested here. Next to the big drop, an incoming folder with an unusable
name and a drop still uploading (no manifest) check the drop-level rules.

Asserted: every line is accounted for, each by its physical line number (pooled if good,
quarantined with the injected reason if bad; no good record quarantined, no bad record
pooled), the counts per reason equal what was injected, the stage's summary (the
ingestion report in ``_SUCCESS``), quarantine files, ledger and pool say the same, and a
re-run (same run: skipped; new run: no new drop) adds nothing.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile as sf
from support.dropfactory import bucket_env, check_invariant, nan_audio, s3_credentials, snapshot
from support.wavfactory import make_audio, manifest_line, record, sha256

from pipeline.config import IngestConfig
from pipeline.data.manifest import read_manifest, resolve_audio_key
from pipeline.run import RunContext
from pipeline.stages.ingest import ingest
from pipeline.stages.ingest.rules import Reason

pytestmark = pytest.mark.integration

NORMAL_WEEK = 40  # utterances per week of the end-to-end DAG test (tests/support/dag_env.py TINY)
VOLUME = 10 * NORMAL_WEEK
PER_REASON = 8  # bad records per reason code (variants cycled); the rest of VOLUME is good
DROP = "week-48-flood"
IGNORED_DROP = "bad drop!"  # not a usable drop id: ignored and reported
PENDING_DROP = "week-49"  # audio uploaded, manifest not yet: left for a later run
RULES = IngestConfig(max_duration_s=5.0, max_audio_bytes=150_000)
TARGET_SR = 8000  # audio.sample_rate of the default config


@dataclass
class Case:
    """One manifest line and its audio; ``reason`` None = must be pooled."""

    line: bytes
    files: dict[str, bytes]
    reason: Reason | None
    utt_id: str | None
    duplicate_of: str | None = None  # utt_id of the good record a duplicate copies


class Factory:
    """Unique ids and audio for the cases (every audio distinct unless a case copies one on purpose)."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self.seed = 0

    def next(self) -> int:
        self.seed += 1
        return self.seed

    def audio(self, seconds: float = 0.4, sr: int = 8000, **kw) -> bytes:
        return make_audio(seconds=seconds, sr=sr, seed=self.next(), **kw)

    def bad(self, reason: Reason, *, audio: bytes | None = None, path: str | None = None, raw: bytes | None = None,
            seconds: float = 0.4, **fields) -> Case:
        n = self.next()
        utt_id = fields.pop("utt_id", f"bad-{reason}-{n:04d}")
        if raw is not None:
            return Case(raw, {}, reason, None)
        name = f"audio/bad-{n:04d}.wav"
        files = {} if audio is None else {name: audio}
        rec = record(utt_id, path or name, seconds, **fields)
        return Case(manifest_line(rec), files, reason, utt_id if isinstance(utt_id, str) else None)


# --------------------------------------------------------------------------- good records


def good_cases(f: Factory, n: int) -> list[Case]:
    """``n`` valid records in a mix of formats, rates, channel counts and path spellings."""
    kinds = [
        lambda: (f.audio(0.4, 8000), "wav", 0.4, {}),
        lambda: (f.audio(0.5, 16000), "wav", 0.5, {}),
        lambda: (f.audio(0.3, 44100, channels=2), "wav", 0.3, {}),
        lambda: (f.audio(0.6, 22050, fmt="FLAC"), "flac", 0.6, {}),
        lambda: (f.audio(0.3, 48000, subtype="FLOAT"), "wav", 0.3, {}),
        lambda: (f.audio(0.3, 44056), "wav", 0.3, {}),  # an odd but cheap rate (reduced ratio 5507:1000)
        lambda: (f.audio(0.4, 11025), "wav", 0.4, {"text": "Four 1 FIVE!"}),  # normalized to "four one five"
    ]
    cases = []
    for i in range(n):
        data, ext, seconds, extra = kinds[i % len(kinds)]()
        utt_id, name = f"good-{i:04d}", f"audio/good-{i:04d}.{ext}"
        path = name
        if i % 5 == 1:
            path = f"s3://{f.bucket}/pfx/incoming/{DROP}/{name}"  # the drop's own URI
        elif i % 5 == 2:
            path = f"./{name}"
        if i % 3 == 0:
            extra = {**extra, "sha256": sha256(data).upper()}  # declared, in upper case
        cases.append(Case(manifest_line(record(utt_id, path, seconds, **extra)), {name: data}, None, utt_id))
    return cases


# --------------------------------------------------------------------------- defects, per reason code


def _unparseable(f: Factory) -> list[Case]:
    r = Reason.UNPARSEABLE
    return [
        f.bad(r, raw=b"this is not json"),
        f.bad(r, raw=b"[1, 2, 3]"),
        f.bad(r, raw=b'"a string"'),
        f.bad(r, raw=b"NaN"),
        f.bad(r, raw=b'{"utt_id": "truncated", "audio_filepath": "audio/x.wav"'),
        f.bad(r, raw=b"\xef\xbb\xbf" + manifest_line(record("bom", "audio/x.wav"))),  # a UTF-8 BOM
        f.bad(r, raw=b"[" * 100_000 + b"]" * 100_000),  # nested deeper than the parser's recursion limit
        f.bad(r, raw=b'{"utt_id": "big", "n": ' + b"9" * 5000 + b"}"),  # an int beyond 4300 digits
    ]


def _missing_field(f: Factory) -> list[Case]:
    r = Reason.MISSING_FIELD
    # utt_id, speaker and group are optional (a plain NeMo line): only a bad value given for them is a defect
    cases = [f.bad(r, audio=f.audio(), **{name: None}) for name in ("audio_filepath", "text")]
    cases += [f.bad(r, audio=f.audio(), **{name: ""}) for name in ("speaker", "group", "utt_id")]
    return cases + [
        f.bad(r, audio=f.audio(), duration=None),
        f.bad(r, audio=f.audio(), speaker={"name": "x"}),
        f.bad(r, audio=f.audio(), text=415),
        f.bad(r, audio=f.audio(), duration="0.4"),
        f.bad(r, audio=f.audio(), duration=True),
        f.bad(r, audio=f.audio(), duration=10**400),  # an int too large for a float
        f.bad(r, audio=f.audio(), sha256="not-a-sha"),
        f.bad(r, audio=f.audio(), group="   "),
        f.bad(r, audio=f.audio(), utt_id=["a", "list"]),
    ]


def _bad_text(f: Factory) -> list[Case]:
    r = Reason.BAD_TEXT
    bad_utf8 = f.bad(r, audio=f.audio(), text="four XX one")
    bad_utf8.line = bad_utf8.line.replace(b"XX", b"\xff\xfe")
    surrogate = f.bad(r, audio=f.audio(), text="four ZZ one")
    surrogate.line = surrogate.line.replace(b"ZZ", b"\\ud800")  # an unpaired surrogate escape
    return [
        bad_utf8,
        surrogate,
        f.bad(r, audio=f.audio(), text="?!"),
        f.bad(r, audio=f.audio(), text=""),
        f.bad(r, audio=f.audio(), text="four \u65e5\u672c one"),
        f.bad(r, audio=f.audio(), text="\u0447\u0435\u0442\u044b\u0440\u0435"),  # Cyrillic
    ]


def _path_escape(f: Factory) -> list[Case]:
    r = Reason.PATH_ESCAPE
    return [
        f.bad(r, path=f"../{PENDING_DROP}/audio/p-0.wav"),
        f.bad(r, path="audio/../../week-01/x.wav"),
        f.bad(r, path="/etc/passwd"),
        f.bad(r, path="s3://another-bucket/incoming/x.wav"),
        f.bad(r, path=f"s3://{f.bucket}/pfx/incoming/{PENDING_DROP}/audio/p-0.wav"),  # another drop's URI
        f.bad(r, path="file:///etc/passwd"),
        f.bad(r, path="audio//double-slash.wav"),
        f.bad(r, path="./"),
        f.bad(r, path="audio/nul\x00byte.wav"),
        f.bad(r, path="audio/new\nline.wav"),
        f.bad(r, path="audio/" + "x" * 1100 + ".wav"),  # a key longer than S3 allows
    ]


def _missing_audio(f: Factory) -> list[Case]:
    r = Reason.MISSING_AUDIO
    return [
        f.bad(r, path="audio/ghost.wav"),
        f.bad(r, path="audio"),  # a folder, not an object
        f.bad(r, path="audio/GOOD-0000.WAV"),  # keys are case-sensitive
        f.bad(r, path="audio/%2e%2e/x.wav"),
    ]


def _too_large(f: Factory) -> list[Case]:
    r = Reason.TOO_LARGE
    return [
        f.bad(r, audio=f.audio(1.0, 44100, channels=2, subtype="FLOAT")),
        f.bad(r, audio=f.audio(1.0, 8000) + bytes(150_000)),
        f.bad(r, path="manifest.jsonl"),  # the drop's own manifest (> 150 kB: it holds a 200 kB line)
    ]


def _checksum_mismatch(f: Factory) -> list[Case]:
    r = Reason.CHECKSUM_MISMATCH
    other = f.audio()
    return [
        f.bad(r, audio=f.audio(), sha256="0" * 64),
        f.bad(r, audio=f.audio(), sha256=sha256(other)),  # the checksum of other bytes
    ]


def _undecodable(f: Factory) -> list[Case]:
    r = Reason.UNDECODABLE
    return [
        f.bad(r, audio=b"RIFF" + bytes(range(256)) * 4),
        f.bad(r, audio=b"\x00"),
        f.bad(r, audio=f.audio()[:30]),  # a truncated header
        f.bad(r, audio=b"PK\x03\x04" + bytes(500)),  # a zip
        f.bad(r, audio=b"#!/bin/sh\nrm -rf /\n"),
    ]


def _non_finite(f: Factory) -> list[Case]:
    r = Reason.NON_FINITE

    def with_value(value: float) -> bytes:
        samples = np.full((4000, 1), 0.1, dtype=np.float32)
        samples[f.next() % 4000, 0] = value
        return make_audio(samples=samples, subtype="FLOAT")

    return [f.bad(r, audio=nan_audio(), seconds=1.0), f.bad(r, audio=with_value(np.inf), seconds=0.5),
            f.bad(r, audio=with_value(-np.inf), seconds=0.5)]


def _too_short(f: Factory) -> list[Case]:
    r = Reason.TOO_SHORT
    empty = make_audio(samples=np.zeros((0, 1), dtype=np.float32))
    return [f.bad(r, audio=f.audio(0.05), seconds=0.05), f.bad(r, audio=empty, seconds=0.0),
            f.bad(r, audio=f.audio(0.01, 96001), seconds=0.01)]  # too short before its rate matters


def _too_long(f: Factory) -> list[Case]:
    r = Reason.TOO_LONG
    return [f.bad(r, audio=f.audio(6.0, 8000), seconds=6.0), f.bad(r, audio=f.audio(30.0, 1000), seconds=30.0)]


def _silent(f: Factory) -> list[Case]:
    r = Reason.SILENT
    return [f.bad(r, audio=make_audio(seconds=0.4, amplitude=0.0)), f.bad(r, audio=f.audio(0.4, amplitude=1e-5))]


def _duration_mismatch(f: Factory) -> list[Case]:
    r = Reason.DURATION_MISMATCH
    return [f.bad(r, audio=f.audio(0.4), seconds=2.0), f.bad(r, audio=f.audio(1.0), seconds=0.4),
            f.bad(r, audio=f.audio(0.4, 16000, channels=2), seconds=0.8)]


def _unsupported_sample_rate(f: Factory) -> list[Case]:
    r = Reason.UNSUPPORTED_SAMPLE_RATE
    # each would take seconds to minutes and GBs of memory to resample (reduced ratios 96001:8000, ...)
    return [f.bad(r, audio=f.audio(0.5, 96001), seconds=0.5), f.bad(r, audio=f.audio(0.5, 44101), seconds=0.5),
            f.bad(r, audio=f.audio(0.5, 7919), seconds=0.5), f.bad(r, audio=f.audio(0.3, 22254), seconds=0.3)]


# duplicates refer to good records; they are placed after their original in the drop
def _duplicate_utt_id(f: Factory) -> list[Case]:
    return [f.bad(Reason.DUPLICATE_UTT_ID, audio=f.audio(), utt_id="@dup") for _ in range(3)]


def _duplicate_audio(f: Factory) -> list[Case]:
    return [f.bad(Reason.DUPLICATE_AUDIO, audio=b"@dup") for _ in range(3)]


DEFECTS: dict[Reason, Callable[[Factory], list[Case]]] = {
    Reason.UNPARSEABLE: _unparseable,
    Reason.MISSING_FIELD: _missing_field,
    Reason.BAD_TEXT: _bad_text,
    Reason.PATH_ESCAPE: _path_escape,
    Reason.MISSING_AUDIO: _missing_audio,
    Reason.TOO_LARGE: _too_large,
    Reason.CHECKSUM_MISMATCH: _checksum_mismatch,
    Reason.DUPLICATE_UTT_ID: _duplicate_utt_id,
    Reason.DUPLICATE_AUDIO: _duplicate_audio,
    Reason.UNDECODABLE: _undecodable,
    Reason.NON_FINITE: _non_finite,
    Reason.TOO_SHORT: _too_short,
    Reason.TOO_LONG: _too_long,
    Reason.SILENT: _silent,
    Reason.DURATION_MISMATCH: _duration_mismatch,
    Reason.UNSUPPORTED_SAMPLE_RATE: _unsupported_sample_rate,
}


@dataclass
class Flood:
    lines: list[bytes]  # physical lines, blank ones included
    files: dict[str, bytes]
    expected: dict[int, Reason | None]  # physical line number -> reason (None: pooled)
    good: dict[str, int]  # utt_id -> line number
    duplicates: dict[int, str]  # line number -> utt_id of the original
    variants: int


def build_flood(bucket: str, seed: int = 7) -> Flood:
    missing = [r for r in Reason if r not in DEFECTS]
    assert not missing, f"no defect generator for reason code(s) {missing}: add one to DEFECTS"
    f = Factory(bucket)
    variants = {reason: make(f) for reason, make in DEFECTS.items()}
    assert all(v and all(c.reason is reason for c in v) for reason, v in variants.items())
    bad = [variants[r][i % len(variants[r])] for r in DEFECTS for i in range(PER_REASON)]
    bad = [Case(c.line, dict(c.files), c.reason, c.utt_id) for c in bad]  # repeated variants: fresh copies
    good = good_cases(f, VOLUME - len(bad))
    rng = np.random.default_rng(seed)

    # repeated variants get their own utt_id (and keep their audio: a rejected record indexes nothing)
    for i, case in enumerate(bad):
        if case.utt_id and case.utt_id != "@dup" and case.line.count(f'"{case.utt_id}"'.encode()) == 1:
            new_id = f"{case.utt_id}-{i}"
            case.line = case.line.replace(f'"{case.utt_id}"'.encode(), f'"{new_id}"'.encode())
            case.utt_id = new_id

    order = [*good, *(c for c in bad if c.reason not in (Reason.DUPLICATE_UTT_ID, Reason.DUPLICATE_AUDIO))]
    order = [order[i] for i in rng.permutation(len(order))]
    dups = [c for c in bad if c.reason in (Reason.DUPLICATE_UTT_ID, Reason.DUPLICATE_AUDIO)]
    for k, case in enumerate(dups):
        original = good[int(rng.integers(len(good)))]
        position = order.index(original)
        [(orig_name, orig_audio)] = original.files.items()
        if case.reason is Reason.DUPLICATE_UTT_ID:
            case.line = case.line.replace(b'"@dup"', json.dumps(original.utt_id).encode())
            case.utt_id = original.utt_id
        else:  # the same bytes as the original, under a new name or the original's own file
            copy_name = f"audio/dup-audio-{k}.wav"
            case.files = {copy_name: orig_audio} if int(rng.integers(2)) else {}
            original_rec = json.loads(original.line)
            rec = json.loads(case.line) | {"audio_filepath": copy_name if case.files else orig_name,
                                           "duration": original_rec["duration"]}
            case.line = manifest_line(rec)
        case.duplicate_of = original.utt_id
        order.insert(int(rng.integers(position + 1, len(order) + 1)), case)

    lines, files, expected, good_lines, duplicates = [], {}, {}, {}, {}
    for case in order:
        if rng.random() < 0.03:
            lines.append(b"   ")  # blank: skipped and not counted, but numbered
        if rng.random() < 0.1:
            case.line += b"\r"  # a CRLF line end
        lines.append(case.line)
        number = len(lines)
        expected[number] = case.reason
        if case.reason is None:
            good_lines[case.utt_id] = number
        if case.duplicate_of:
            duplicates[number] = case.duplicate_of
        for name, data in case.files.items():
            assert files.setdefault(name, data) == data, name
    return Flood(lines, files, expected, good_lines, duplicates, sum(len(v) for v in variants.values()))


# --------------------------------------------------------------------------- the test


@pytest.fixture
def env(moto_server):
    with s3_credentials():
        yield bucket_env(moto_server, RULES)


def _upload(store, flood: Flood) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.put_bytes(f"incoming/{DROP}/{kv[0]}", kv[1]), flood.files.items()))
        store.put_bytes(f"incoming/{PENDING_DROP}/audio/p-0.wav", make_audio(seed=99_999))
        store.put_bytes(f"incoming/{IGNORED_DROP}/manifest.jsonl", manifest_line(record("x", "x.wav")) + b"\n")
    store.put_bytes(f"incoming/{DROP}/manifest.jsonl", b"\n".join(flood.lines) + b"\n")  # manifest last


@pytest.mark.scenario(7, expected="a 10x drop (400 lines) holding every defect kind next to valid records: every "
                                   "line lands in the pool or in quarantine with the injected reason; a re-run adds "
                                   "nothing")
def test_a_hostile_drop_at_10x_volume_is_fully_accounted_for(env, observe):
    bucket, cfg, store = env
    flood = build_flood(bucket)
    injected = Counter(str(r) for r in flood.expected.values() if r is not None)
    n_lines = len(flood.expected)
    assert n_lines == VOLUME and set(injected) == {str(r) for r in Reason}
    t0 = time.perf_counter()
    _upload(store, flood)
    upload_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = ingest(RunContext(run_id="run-flood", config=cfg, store=store), progress=False)
    ingest_s = time.perf_counter() - t0

    # the report: totals, per reason, drops
    check_invariant(summary)
    n_good = len(flood.good)
    assert summary["lines_read"] == n_lines
    assert summary["accepted"] == n_good == summary["pool_size"]
    assert summary["unparseable_lines"] == injected["unparseable"]
    assert summary["reasons"] == dict(sorted(injected.items()))
    assert len(summary["quarantined"]) == sum(injected.values()) - injected["unparseable"]
    assert summary["drops"] == [DROP]
    assert summary["pending_drops"] == [PENDING_DROP] and summary["ignored_drops"] == [IGNORED_DROP]
    assert json.loads(store.get_text("runs/run-flood/ingest/_SUCCESS")) == {k: v for k, v in summary.items()
                                                                           if k != "skipped"}

    # line by line: the quarantine holds exactly the bad lines, each with its injected reason
    entries = [json.loads(x) for x in store.get_text(f"state/quarantine/{DROP}.jsonl").splitlines()]
    assert store.get_text("runs/run-flood/ingest/quarantine.jsonl") == store.get_text(f"state/quarantine/{DROP}.jsonl")
    got = {e["line"]: e["reason"] for e in entries}
    assert len(got) == len(entries) and all(e["drop"] == DROP and e["message"] for e in entries)
    want = {n: str(r) for n, r in flood.expected.items() if r is not None}
    wrong = {n: (want.get(n), got.get(n), flood.lines[n - 1][:120]) for n in set(want) | set(got)
             if want.get(n) != got.get(n)}
    assert wrong == {}, wrong
    good_quarantined = [n for n in got if flood.expected[n] is None]
    for e in entries:
        if e["line"] in flood.duplicates:
            assert e["duplicate_of"] == {"utt_id": flood.duplicates[e["line"]], "drop": DROP}

    # the pool: exactly the good records, converted, content-addressed
    version = summary["pool_version"]
    assert store.get_text("state/pool/CURRENT").strip() == version
    pool_key = f"state/pool/{version}/manifest.jsonl"
    utts = read_manifest(store, pool_key)
    assert sorted(u.utt_id for u in utts) == sorted(flood.good)
    bad_pooled = [u.utt_id for u in utts if u.utt_id not in flood.good]
    assert {u.text for u in utts} == {"four one five"} and {u.drop for u in utts} == {DROP}
    audio_keys = sorted(resolve_audio_key(pool_key, u.audio_filepath) for u in utts)
    assert audio_keys == sorted(k for k in store.list("state/audio/")) and len(set(audio_keys)) == n_good
    for key in audio_keys[:: max(1, n_good // 20)]:
        info = sf.info(io.BytesIO(store.get_bytes(key)))
        assert (info.samplerate, info.channels, info.subtype) == (TARGET_SR, 1, "PCM_16")
    ledger = json.loads(store.get_text("state/ingest/ledger.json"))
    assert ledger["pool_version"] == version and set(ledger["drops"]) == {DROP}
    assert ledger["drops"][DROP]["counts"] == {"lines_read": n_lines, "accepted": n_good,
                                               "quarantined": len(summary["quarantined"]),
                                               "unparseable_lines": injected["unparseable"]}

    # re-runs add nothing: the same run is skipped with the same report; a new run takes no drop
    before = snapshot(store)
    again = ingest(RunContext(run_id="run-flood", config=cfg, store=store), progress=False)
    assert summary["skipped"] is False and again["skipped"] is True
    assert {k: v for k, v in again.items() if k != "skipped"} == {k: v for k, v in summary.items() if k != "skipped"}
    assert snapshot(store) == before
    t0 = time.perf_counter()
    later = ingest(RunContext(run_id="run-later", config=cfg, store=store), progress=False)
    rerun_s = time.perf_counter() - t0
    assert later["drops"] == [] and later["lines_read"] == 0 and later["accepted"] == 0
    assert later["pool_version"] == version and later["pool_size"] == n_good
    after = snapshot(store)
    assert {k: v for k, v in after.items() if not k.startswith("runs/run-later/")} == before

    observe(
        f"{n_lines} lines in one drop ({n_good} good, {n_lines - n_good} bad: {PER_REASON} for each of "
        f"{len(Reason)} reason codes from {flood.variants} variants): {summary['accepted']} pooled, "
        f"{len(summary['quarantined'])} quarantined + {summary['unparseable_lines']} unparseable, "
        f"per-reason counts = injected; {len(good_quarantined)} good quarantined, {len(bad_pooled)} bad pooled; "
        f"upload {upload_s:.1f} s, ingest {ingest_s:.1f} s ({n_lines / ingest_s:.0f} lines/s), "
        f"re-run {rerun_s:.1f} s: 0 drops taken, state unchanged"
    )
