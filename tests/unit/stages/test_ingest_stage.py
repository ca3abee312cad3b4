"""The ingest stage on a local-folder store: layout, blank lines, pending drops, crash recovery."""

from __future__ import annotations

import io
import json

import pytest
import soundfile as sf
from support.wavfactory import make_audio, manifest_line, record, sha256

from pipeline.config import Config
from pipeline.data.manifest import read_manifest, resolve_audio_key
from pipeline.data.pool import read_pool
from pipeline.run import RunContext
from pipeline.stages.ingest.stage import IngestError, _check_invariant, ingest
from pipeline.storage import ObjectStore, StorageError, open_store


def put_drop(store: ObjectStore, drop_id: str, lines: list[bytes], audio: dict[str, bytes]) -> None:
    for name, data in audio.items():
        store.put_bytes(f"incoming/{drop_id}/{name}", data)
    store.put_bytes(f"incoming/{drop_id}/manifest.jsonl", b"\n".join(lines) + b"\n")


def simple_drop(store: ObjectStore, drop_id: str, n: int, seed0: int) -> list[str]:
    audio = {f"{drop_id}-{i}.wav": make_audio(seed=seed0 + i) for i in range(n)}
    lines = [manifest_line(record(f"{drop_id}-{i}", f"{drop_id}-{i}.wav")) for i in range(n)]
    put_drop(store, drop_id, lines, audio)
    return [f"{drop_id}-{i}" for i in range(n)]


@pytest.fixture
def ctx(tmp_path) -> RunContext:
    return RunContext(run_id="run-1", config=Config(), store=open_store(f"file://{tmp_path}/store"))


def with_run(ctx: RunContext, run_id: str) -> RunContext:
    return RunContext(run_id=run_id, config=ctx.config, store=ctx.store)


def test_layout_pool_and_audio(ctx: RunContext) -> None:
    store = ctx.store
    stereo = make_audio(seconds=0.8, sr=44100, channels=2, seed=9)
    put_drop(
        store,
        "week-01",
        [
            manifest_line(record("b", "b.wav", text="Four 15!")),
            manifest_line(record("a", "sub/a.flac", duration=0.8)),
        ],
        {"b.wav": make_audio(seed=1), "sub/a.flac": stereo},
    )
    summary = ingest(ctx, progress=False)
    assert summary["accepted"] == 2 and summary["lines_read"] == 2 and summary["drops"] == ["week-01"]
    version = summary["pool_version"]
    assert store.get_text("state/pool/CURRENT").strip() == version
    pool_key = f"state/pool/{version}/manifest.jsonl"
    utts = read_manifest(store, pool_key)
    assert [u.utt_id for u in utts] == ["a", "b"]  # sorted by utt_id
    assert utts[1].text == "four one five" and utts[1].drop == "week-01"
    assert utts[0].sha256 == sha256(stereo)  # sha of the ORIGINAL bytes
    assert utts[0].audio_filepath == f"../../audio/{sha256(stereo)[:2]}/{sha256(stereo)}.wav"
    info = sf.info(io.BytesIO(store.get_bytes(resolve_audio_key(pool_key, utts[0].audio_filepath))))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    assert utts[0].duration == pytest.approx(0.8, abs=1e-3)
    assert len(read_pool(store)) == 2  # the downstream reader agrees
    ledger = json.loads(store.get_text("state/ingest/ledger.json"))
    assert ledger["pool_version"] == version
    entry = ledger["drops"]["week-01"]
    assert entry["run_id"] == "run-1" and entry["pool_version"] == version
    assert entry["counts"] == {"lines_read": 2, "accepted": 2, "quarantined": 0, "unparseable_lines": 0}
    assert entry["manifest_sha256"] == sha256(store.get_bytes("incoming/week-01/manifest.jsonl"))
    assert store.get_text("state/quarantine/week-01.jsonl") == ""
    assert json.loads(store.get_text(f"state/pool/{version}/lineage.json"))["parent"] is None


def test_blank_lines_are_skipped_but_keep_line_numbers(ctx: RunContext) -> None:
    put_drop(
        ctx.store,
        "d1",
        [b"", manifest_line(record("a", "a.wav")), b"   ", b"\r", b"{broken", manifest_line(record("b", "nope.wav"))],
        {"a.wav": make_audio(seed=1)},
    )
    summary = ingest(ctx, progress=False)
    assert summary["lines_read"] == 3 and summary["accepted"] == 1 and summary["unparseable_lines"] == 1
    assert [(q["line"], q["reason"]) for q in summary["quarantined"]] == [(6, "missing_audio")]
    entries = [json.loads(x) for x in ctx.store.get_text("state/quarantine/d1.jsonl").splitlines()]
    assert [(e["line"], e["reason"], e["utt_id"]) for e in entries] == [
        (5, "unparseable", None),
        (6, "missing_audio", "b"),
    ]
    assert ctx.store.get_text("runs/run-1/ingest/quarantine.jsonl") == ctx.store.get_text("state/quarantine/d1.jsonl")


def test_nemo_records_without_utt_id_get_one_from_their_path_in_the_quarantine_too(ctx: RunContext) -> None:
    """Plain NeMo lines (audio_filepath, duration, text): accepted or quarantined, each under its derived id."""
    audio = {"audio/ok.wav": make_audio(seed=1), "audio/quiet.wav": make_audio(amplitude=0.0)}
    nemo = [{"audio_filepath": name, "duration": 1.0, "text": "one"} for name in audio]
    nemo.append({"audio_filepath": "../d0/x.wav", "duration": 1.0, "text": "two"})
    put_drop(ctx.store, "d1", [manifest_line(r) for r in nemo], audio)
    summary = ingest(ctx, progress=False)
    assert summary["accepted"] == 1 and summary["lines_read"] == 3
    assert [(q["utt_id"], q["reason"]) for q in summary["quarantined"]] == [
        ("d1:audio-quiet", "silent"),
        (None, "path_escape"),  # a path that leaves the drop names no file of it, so no id either
    ]
    [utt] = read_pool(ctx.store).utterances
    assert (utt.utt_id, utt.speaker, utt.group, utt.sha256) == ("d1:audio-ok", "unknown", "unknown",
                                                                sha256(audio["audio/ok.wav"]))


def test_drop_without_manifest_is_pending_until_complete(ctx: RunContext) -> None:
    ctx.store.put_bytes("incoming/d2/a.wav", make_audio(seed=5))
    first = ingest(ctx, progress=False)
    assert first["pending_drops"] == ["d2"] and first["drops"] == [] and first["pool_version"] is None
    assert not ctx.store.exists("state/ingest/ledger.json")
    ctx.store.put_bytes("incoming/d2/manifest.jsonl", manifest_line(record("a", "a.wav")) + b"\n")
    second = ingest(with_run(ctx, "run-2"), progress=False)
    assert second["drops"] == ["d2"] and second["accepted"] == 1 and second["pending_drops"] == []


def test_only_rejections_keep_the_pool_version(ctx: RunContext) -> None:
    simple_drop(ctx.store, "d1", 2, seed0=10)
    v1 = ingest(ctx, progress=False)["pool_version"]
    put_drop(ctx.store, "d2", [manifest_line(record("x", "x.wav"))], {"x.wav": b"not audio"})
    s2 = ingest(with_run(ctx, "run-2"), progress=False)
    assert s2["pool_version"] == v1 and s2["pool_size"] == 2
    assert [q["reason"] for q in s2["quarantined"]] == ["undecodable"]
    assert json.loads(ctx.store.get_text("state/ingest/ledger.json"))["drops"]["d2"]["pool_version"] == v1
    assert ctx.store.list_dirs("state/pool") == [v1]


class _FailingWrites:
    """Wraps a store so that writing ``key`` raises, like a permanent S3 failure."""

    def __init__(self, store: ObjectStore, key: str):
        self._store, self._key = store, key

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put_text(self, key: str, text: str) -> None:
        if key == self._key:
            raise StorageError(f"write {self._store.uri(key)} failed: AccessDenied (HTTP 403)")
        self._store.put_text(key, text)


def test_crash_before_the_ledger_leaves_it_unchanged_and_retry_redoes(ctx: RunContext, tmp_path) -> None:
    simple_drop(ctx.store, "d1", 3, seed0=20)
    broken = RunContext(run_id="run-1", config=ctx.config, store=_FailingWrites(ctx.store, "state/ingest/ledger.json"))
    with pytest.raises(StorageError, match="ledger.json"):
        ingest(broken, progress=False)
    assert not ctx.store.exists("state/ingest/ledger.json")
    assert not ctx.store.exists("state/pool/CURRENT")
    assert not ctx.is_complete("ingest")
    retry = ingest(ctx, progress=False)
    assert retry["accepted"] == 3 and retry["drops"] == ["d1"] and not retry["quarantined"]


def two_drops(store: ObjectStore) -> None:
    simple_drop(store, "d1", 2, seed0=30)
    put_drop(store, "d2", [manifest_line(record("d1-0", "a.wav")), b"nope"], {"a.wav": make_audio(seed=31)})


def test_crash_after_the_ledger_is_resumed_with_the_same_summary(ctx: RunContext, tmp_path) -> None:
    two_drops(ctx.store)
    broken = RunContext(run_id="run-1", config=ctx.config, store=_FailingWrites(ctx.store, "state/pool/CURRENT"))
    with pytest.raises(StorageError, match="CURRENT"):
        ingest(broken, progress=False)
    assert json.loads(ctx.store.get_text("state/ingest/ledger.json"))["drops"].keys() == {"d1", "d2"}
    assert not ctx.store.exists("state/pool/CURRENT")

    retry = ingest(ctx, progress=False)  # same run: reports what the committed attempt did
    reference_ctx = RunContext(run_id="run-1", config=ctx.config, store=open_store(f"file://{tmp_path}/ref"))
    two_drops(reference_ctx.store)
    reference = ingest(reference_ctx, progress=False)
    compared = ("lines_read", "accepted", "quarantined", "unparseable_lines", "drops", "pool_version", "pool_size")
    for key in (*compared, "reasons"):
        assert retry[key] == reference[key], key
    assert ctx.store.get_text("state/pool/CURRENT").strip() == retry["pool_version"]
    run_quarantine = "runs/run-1/ingest/quarantine.jsonl"
    assert ctx.store.get_text(run_quarantine) == reference_ctx.store.get_text(run_quarantine)


def test_a_later_run_repairs_a_stale_current_pointer(ctx: RunContext) -> None:
    simple_drop(ctx.store, "d1", 1, seed0=40)
    version = ingest(ctx, progress=False)["pool_version"]
    ctx.store.put_text("state/pool/CURRENT", "0000000000000000\n")
    assert ingest(with_run(ctx, "run-2"), progress=False)["pool_version"] == version
    assert ctx.store.get_text("state/pool/CURRENT").strip() == version


def test_corrupt_ledger_fails_early(ctx: RunContext) -> None:
    ctx.store.put_text("state/ingest/ledger.json", "{not json")
    with pytest.raises(IngestError, match="corrupt"):
        ingest(ctx, progress=False)


def test_pool_without_ledger_fails_early(ctx: RunContext) -> None:
    ctx.store.put_text("state/pool/CURRENT", "abc\n")
    with pytest.raises(IngestError, match="ledger"):
        ingest(ctx, progress=False)


def test_invariant_check_raises() -> None:
    _check_invariant(5, 3, 1, 1, "x")
    with pytest.raises(IngestError, match="invariant"):
        _check_invariant(5, 3, 1, 0, "drop d1")
