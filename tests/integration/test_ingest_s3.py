"""The ingest stage against moto's real S3 HTTP server on 127.0.0.1.

One drop holds every defect the rules know next to valid mono 8 kHz, stereo, 44.1 kHz and
FLAC records; later drops check re-runs, new drops, cross-week duplicates and a late drop
with an older name. The moto server is the session fixture of ``tests/conftest.py``; each
test gets its own bucket.
"""

from __future__ import annotations

import io
import json

import pytest
import soundfile as sf
from support.dropfactory import Drop, bucket_env, check_invariant, nan_audio, s3_credentials, snapshot, upload
from support.faultproxy import Fault, FaultProxy
from support.wavfactory import make_audio, manifest_line, record, sha256

from pipeline.config import IngestConfig, StorageConfig
from pipeline.data.audio import decode_audio
from pipeline.data.manifest import read_manifest, resolve_audio_key
from pipeline.run import RunContext
from pipeline.stages.ingest.stage import ingest
from pipeline.storage import StorageError, open_store

pytestmark = pytest.mark.integration

RULES = IngestConfig(max_duration_s=5.0, max_audio_bytes=150_000)
WEEK1, WEEK2, LATE = "week-10", "week-11", "week-05"


def week1_drop(bucket: str) -> Drop:
    ok_mono = make_audio(seconds=1.0, sr=8000, seed=1)
    files = {
        "audio/ok-mono8k.wav": ok_mono,
        "audio/ok-stereo.wav": make_audio(seconds=1.2, sr=16000, channels=2, seed=2),
        "audio/ok-44k.wav": make_audio(seconds=0.7, sr=44100, seed=3),
        "audio/ok-flac.flac": make_audio(seconds=1.5, sr=22050, fmt="FLAC", seed=4),
        "audio/ok-uri.wav": make_audio(seconds=0.5, sr=8000, seed=5),
        "audio/big.wav": make_audio(seconds=1.0, sr=44100, channels=2, subtype="FLOAT", seed=6),
        "audio/garbage.wav": b"RIFF" + bytes(range(256)) * 4,
        "audio/nan.wav": nan_audio(),
        "audio/silent.wav": make_audio(seconds=1.0, amplitude=0.0),
        "audio/short.wav": make_audio(seconds=0.05, seed=7),
        "audio/long.wav": make_audio(seconds=6.0, seed=8),
        "audio/mismatch.wav": make_audio(seconds=1.0, seed=9),
        "audio/copy-of-mono.wav": ok_mono,
        "audio/dup-id.wav": make_audio(seconds=1.0, seed=10),
        "audio/checksum.wav": make_audio(seconds=1.0, seed=11),
        "audio/bad-utf8.wav": make_audio(seconds=1.0, seed=12),
        "audio/empty-text.wav": make_audio(seconds=1.0, seed=13),
        "audio/no-speaker.wav": make_audio(seconds=1.0, seed=14),
    }
    bad_utf8 = manifest_line(record("w10-bad-utf8", "audio/bad-utf8.wav", text="four XX one"))
    bad_utf8 = bad_utf8.replace(b"XX", b"\xff\xfe")  # not valid UTF-8
    lines = [
        manifest_line(record("w10-mono8k", "audio/ok-mono8k.wav", text="Four 1 five")),
        manifest_line(record("w10-stereo", "audio/ok-stereo.wav", duration=1.2)),
        manifest_line(record("w10-44k", "audio/ok-44k.wav", duration=0.7)),
        manifest_line(
            record("w10-flac", "audio/ok-flac.flac", duration=1.5, sha256=sha256(files["audio/ok-flac.flac"]))
        ),
        manifest_line(record("w10-uri", f"s3://{bucket}/pfx/incoming/{WEEK1}/audio/ok-uri.wav", duration=0.5)),
        b"",  # blank: skipped, not counted
        b"this is not json",
        b"[1, 2, 3]",
        # a plain NeMo line: only audio_filepath (the drop's own s3:// URI), duration and text
        manifest_line({"audio_filepath": f"s3://{bucket}/pfx/incoming/{WEEK1}/audio/no-speaker.wav", "duration": 1.0,
                       "text": "four one five"}),
        bad_utf8,
        manifest_line(record("w10-empty-text", "audio/empty-text.wav", text="?!")),
        manifest_line(record("w10-escape-dotdot", f"../{WEEK2}/audio/x.wav")),
        manifest_line(record("w10-escape-abs", "/etc/passwd")),
        manifest_line(record("w10-escape-bucket", "s3://another-bucket/incoming/x.wav")),
        manifest_line(record("w10-missing", "audio/ghost.wav")),
        manifest_line(record("w10-big", "audio/big.wav")),
        manifest_line(record("w10-garbage", "audio/garbage.wav")),
        manifest_line(record("w10-nan", "audio/nan.wav")),
        manifest_line(record("w10-silent", "audio/silent.wav")),
        manifest_line(record("w10-short", "audio/short.wav", duration=0.05)),
        manifest_line(record("w10-long", "audio/long.wav", duration=6.0)),
        manifest_line(record("w10-mismatch", "audio/mismatch.wav", duration=2.0)),
        manifest_line(record("w10-copy", "audio/copy-of-mono.wav")),
        manifest_line(record("w10-mono8k", "audio/dup-id.wav")),
        manifest_line(record("w10-checksum", "audio/checksum.wav", sha256="0" * 64)),
        manifest_line(record("w10-no-text", "audio/no-speaker.wav", text=None)),
    ]
    rejected = {
        "w10-no-text": "missing_field",
        "w10-bad-utf8": "bad_text",
        "w10-empty-text": "bad_text",
        "w10-escape-dotdot": "path_escape",
        "w10-escape-abs": "path_escape",
        "w10-escape-bucket": "path_escape",
        "w10-missing": "missing_audio",
        "w10-big": "too_large",
        "w10-garbage": "undecodable",
        "w10-nan": "non_finite",
        "w10-silent": "silent",
        "w10-short": "too_short",
        "w10-long": "too_long",
        "w10-mismatch": "duration_mismatch",
        "w10-copy": "duplicate_audio",
        "w10-checksum": "checksum_mismatch",
    }
    accepted = {"w10-mono8k", "w10-stereo", "w10-44k", "w10-flac", "w10-uri", f"{WEEK1}:audio-no-speaker"}
    return Drop(WEEK1, lines, files, accepted, rejected, unparseable=2)


def valid_drop(drop_id: str, prefix: str, n: int, seed0: int, extra: dict[str, bytes] | None = None) -> Drop:
    files = {f"{prefix}-{i}.wav": make_audio(seconds=0.9, sr=16000, seed=seed0 + i) for i in range(n)}
    lines = [manifest_line(record(f"{prefix}-{i}", f"{prefix}-{i}.wav", duration=0.9)) for i in range(n)]
    return Drop(drop_id, lines, files, {f"{prefix}-{i}" for i in range(n)}, {}, 0)


@pytest.fixture(scope="module")
def s3_endpoint(moto_server):
    """moto's real S3 server (session-wide, from conftest) with dummy credentials for this module."""
    with s3_credentials():
        yield moto_server


@pytest.fixture
def env(s3_endpoint):
    """A fresh bucket; returns (bucket, config, store rooted at s3://bucket/pfx)."""
    return bucket_env(s3_endpoint, RULES)


def context(env, run_id: str) -> RunContext:
    _bucket, cfg, store = env
    return RunContext(run_id=run_id, config=cfg, store=store)


def test_week1_every_record_lands_in_pool_or_quarantine(env) -> None:
    bucket, _cfg, store = env
    drop = week1_drop(bucket)
    upload(store, drop)
    summary = ingest(context(env, "run-1"), progress=False)

    check_invariant(summary)
    assert summary["lines_read"] == len(drop.lines) - 1  # the blank line is not read
    assert summary["unparseable_lines"] == drop.unparseable == 2
    assert summary["accepted"] == len(drop.accepted)
    reasons = {q["utt_id"]: q["reason"] for q in summary["quarantined"] if q["utt_id"] != "w10-mono8k"}
    assert reasons == drop.rejected
    dup_id = [q for q in summary["quarantined"] if q["utt_id"] == "w10-mono8k"]
    assert [q["reason"] for q in dup_id] == ["duplicate_utt_id"] and dup_id[0]["line"] == 24
    copy = next(q for q in summary["quarantined"] if q["utt_id"] == "w10-copy")
    assert copy["duplicate_of"] == {"utt_id": "w10-mono8k", "drop": WEEK1} and "w10-mono8k" in copy["message"]
    assert summary["drops"] == [WEEK1] and summary["pending_drops"] == []

    # the pool: cumulative, sorted, normalized text, 8 kHz mono 16-bit audio, relative paths
    version = summary["pool_version"]
    assert store.get_text("state/pool/CURRENT").strip() == version
    pool_key = f"state/pool/{version}/manifest.jsonl"
    assert sha256(store.get_bytes(pool_key))[:16] == version
    utts = read_manifest(store, pool_key)
    assert [u.utt_id for u in utts] == sorted(drop.accepted) and summary["pool_size"] == len(utts)
    for u in utts:
        audio_key = resolve_audio_key(pool_key, u.audio_filepath)
        assert audio_key == f"state/audio/{u.sha256[:2]}/{u.sha256}.wav"
        info = sf.info(io.BytesIO(store.get_bytes(audio_key)))
        assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
        assert u.drop == WEEK1 and u.text == "four one five"
    by_id = {u.utt_id: u for u in utts}
    assert by_id["w10-flac"].sha256 == sha256(drop.files["audio/ok-flac.flac"])
    assert by_id["w10-stereo"].duration == pytest.approx(1.2, abs=1e-3)
    nemo = by_id[f"{WEEK1}:audio-no-speaker"]  # the full internal record: sha256 computed, speaker/group unknown
    assert (nemo.speaker, nemo.group, nemo.sha256) == ("unknown", "unknown", sha256(drop.files["audio/no-speaker.wav"]))

    # quarantine: per drop in state/, and for the run; unparseable lines are in the files
    entries = [json.loads(x) for x in store.get_text(f"state/quarantine/{WEEK1}.jsonl").splitlines()]
    assert store.get_text("runs/run-1/ingest/quarantine.jsonl") == store.get_text(f"state/quarantine/{WEEK1}.jsonl")
    assert [(e["line"], e["reason"], e["utt_id"]) for e in entries if e["reason"] == "unparseable"] == [
        (7, "unparseable", None),
        (8, "unparseable", None),
    ]
    assert len(entries) == len(summary["quarantined"]) + 2
    assert all(e["drop"] == WEEK1 and e["message"] for e in entries)
    bad = next(e for e in entries if e["utt_id"] == "w10-bad-utf8")
    assert "UTF-8" in bad["message"] and bad["line"] == 10

    ledger = json.loads(store.get_text("state/ingest/ledger.json"))
    assert ledger["pool_version"] == version
    assert ledger["drops"][WEEK1]["counts"] == {
        "lines_read": summary["lines_read"],
        "accepted": 6,
        "quarantined": len(summary["quarantined"]),
        "unparseable_lines": 2,
    }
    assert json.loads(store.get_text("runs/run-1/ingest/_SUCCESS"))["pool_version"] == version


def test_rerunning_the_same_run_changes_nothing(env) -> None:
    bucket, _cfg, store = env
    upload(store, week1_drop(bucket))
    first = ingest(context(env, "run-1"), progress=False)
    before = snapshot(store)
    again = ingest(context(env, "run-1"), progress=False)
    assert again.pop("skipped") is True and first.pop("skipped") is False
    assert again == first
    assert snapshot(store) == before


def test_a_new_run_without_new_drops_takes_nothing(env) -> None:
    bucket, _cfg, store = env
    upload(store, week1_drop(bucket))
    first = ingest(context(env, "run-1"), progress=False)
    state_before = {k: v for k, v in snapshot(store).items() if not k.startswith("runs/")}
    second = ingest(context(env, "run-2"), progress=False)
    check_invariant(second)
    assert second["drops"] == [] and second["lines_read"] == 0 and second["accepted"] == 0
    assert second["quarantined"] == [] and second["pool_version"] == first["pool_version"]
    assert second["pool_size"] == first["pool_size"]
    assert {k: v for k, v in snapshot(store).items() if not k.startswith("runs/")} == state_before


def test_second_drop_adds_only_its_records_and_flags_cross_week_duplicates(env) -> None:
    bucket, _cfg, store = env
    week1 = week1_drop(bucket)
    upload(store, week1)
    v1 = ingest(context(env, "run-1"), progress=False)["pool_version"]

    week2 = valid_drop(WEEK2, "w11", 3, seed0=100)
    week2.files["again.wav"] = week1.files["audio/ok-mono8k.wav"]
    week2.lines.append(manifest_line(record("w11-again", "again.wav")))
    upload(store, week2)
    summary = ingest(context(env, "run-2"), progress=False)

    check_invariant(summary)
    assert summary["drops"] == [WEEK2] and summary["lines_read"] == 4 and summary["accepted"] == 3
    [dup] = summary["quarantined"]
    assert dup["utt_id"] == "w11-again" and dup["reason"] == "duplicate_audio"
    assert dup["duplicate_of"] == {"utt_id": "w10-mono8k", "drop": WEEK1}
    assert WEEK1 in dup["message"]

    v2 = summary["pool_version"]
    assert v2 != v1 and summary["pool_size"] == len(week1.accepted) + 3
    assert sorted(store.list_dirs("state/pool")) == sorted([v1, v2])  # v1 kept for lineage
    assert len(read_manifest(store, f"state/pool/{v1}/manifest.jsonl")) == len(week1.accepted)
    pool = read_manifest(store, f"state/pool/{v2}/manifest.jsonl")
    assert {u.utt_id for u in pool} == week1.accepted | week2.accepted
    assert {u.drop for u in pool if u.utt_id.startswith("w11")} == {WEEK2}
    lineage = json.loads(store.get_text(f"state/pool/{v2}/lineage.json"))
    assert lineage["parent"] == v1 and lineage["drops_added"] == [WEEK2] and lineage["run_id"] == "run-2"
    ledger = json.loads(store.get_text("state/ingest/ledger.json"))
    assert ledger["drops"][WEEK1]["run_id"] == "run-1" and ledger["drops"][WEEK2]["pool_version"] == v2


def test_a_late_drop_with_an_older_name_is_taken(env) -> None:
    bucket, _cfg, store = env
    upload(store, week1_drop(bucket))
    ingest(context(env, "run-1"), progress=False)
    upload(store, valid_drop(WEEK2, "w11", 2, seed0=200))
    v2 = ingest(context(env, "run-2"), progress=False)

    store.put_bytes(f"incoming/{LATE}/late-0.wav", make_audio(seconds=0.9, sr=16000, seed=300))  # no manifest yet
    pending = ingest(context(env, "run-3"), progress=False)
    assert pending["pending_drops"] == [LATE] and pending["drops"] == []

    upload(store, valid_drop(LATE, "late", 2, seed0=300))
    late = ingest(context(env, "run-4"), progress=False)
    check_invariant(late)
    assert late["drops"] == [LATE] and late["accepted"] == 2 and late["pending_drops"] == []
    assert late["pool_size"] == v2["pool_size"] + 2
    assert set(json.loads(store.get_text("state/ingest/ledger.json"))["drops"]) == {WEEK1, WEEK2, LATE}


@pytest.mark.scenario(3, expected="a permanent S3 failure mid-ingest fails the stage with the key named; the ledger, "
                                   "pool and stage output are untouched; the retry takes the whole drop")
def test_a_permanent_s3_failure_names_the_key_and_leaves_the_ledger(env, s3_endpoint, observe) -> None:
    bucket, cfg, store = env
    upload(store, valid_drop(WEEK1, "w10", 3, seed0=400))
    denied = Fault(lambda m, p: m == "GET" and p.endswith("/w10-1.wav"), status=403, code="AccessDenied", times=100)
    proxy = FaultProxy(s3_endpoint, faults=[denied])
    url = proxy.start()
    try:
        failing_cfg = cfg.model_copy(update={"storage": StorageConfig(s3_endpoint_url=url, retry_max_attempts=2)})
        failing_store = open_store(f"s3://{bucket}/pfx", failing_cfg.storage)
        failing = RunContext(run_id="run-1", config=failing_cfg, store=failing_store)
        with pytest.raises(StorageError, match="w10-1.wav") as err:
            ingest(failing, progress=False)
        assert "AccessDenied" in str(err.value)
    finally:
        proxy.stop()
    assert not store.exists("state/ingest/ledger.json") and not store.exists("state/pool/CURRENT")
    assert not store.exists("runs/run-1/ingest/_SUCCESS")
    # outside the drop only whole, content-addressed audio blobs of records converted before the
    # failure may remain (written atomically; the retry reuses them): nothing partial
    left = [k for k in store.list() if not k.startswith("incoming/")]
    for key in left:
        assert key.startswith("state/audio/"), key
        wave, sr = decode_audio(store.get_bytes(key))  # a whole WAV, not a truncated one
        assert sr == cfg.audio.sample_rate and wave.shape[1] > 0

    retry = ingest(context(env, "run-1"), progress=False)
    assert retry["accepted"] == 3 and retry["drops"] == [WEEK1]
    observe(f"stage failed: {str(err.value)[:140]}; left behind: {len(left)} whole content-addressed audio blob(s), "
            f"no ledger/pool/stage output; retry accepted {retry['accepted']}/3")
