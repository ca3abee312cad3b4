"""Manifests: the strict pool format, and manifests as NeMo writes them (NemoManifest).

A NeMo manifest may hold only ``audio_filepath``, ``duration`` and ``text``; its paths may be
relative (to the manifest's folder, also leaving the store root), absolute, or URIs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support.wavfactory import make_audio, sha256

from pipeline.data.manifest import (
    UNKNOWN,
    ManifestError,
    NemoManifest,
    Utterance,
    derive_utt_id,
    parse_manifest,
)
from pipeline.storage import ObjectNotFound, open_store

UTT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+\-]*$")


def write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def put(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


# --- the strict format (the pool) is unchanged ----------------------------------------------


def test_pool_records_still_need_every_field() -> None:
    line = json.dumps({"audio_filepath": "a.wav", "duration": 1.0, "text": "one"}).encode()
    with pytest.raises(ManifestError, match="line 1: field 'speaker' must be a string, got None"):
        parse_manifest(line, source="pool")


# --- derive_utt_id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("audio/0001.wav", None, "audio-0001"),
        ("0001.flac", None, "0001"),
        ("audio/spk 1/utt_07.v2.wav", None, "audio-spk-1-utt_07.v2"),
        ("/data/golden/a.wav", None, "data-golden-a"),
        ("s3://bucket/golden/a.wav", None, "s3-bucket-golden-a"),
        ("audio/0001.wav", "week-03", "week-03:audio-0001"),
        ("..hidden/_x.wav", None, "hidden-_x"),
    ],
)
def test_derive_utt_id_rule(path: str, prefix: str | None, expected: str) -> None:
    assert derive_utt_id(path, prefix) == expected
    assert UTT_ID.match(derive_utt_id(path, prefix))


def test_derive_utt_id_of_a_path_with_no_safe_character_is_still_distinct() -> None:
    one, two = derive_utt_id("日本/語.wav"), derive_utt_id("日本/字.wav")
    assert one.startswith("utt-") and two.startswith("utt-") and one != two and UTT_ID.match(one)


def test_derive_utt_id_bounds_long_paths_and_keeps_them_apart() -> None:
    a, b = "x" * 300 + "a.wav", "x" * 300 + "b.wav"
    assert len(derive_utt_id(a)) <= 200 and len(derive_utt_id(b)) <= 200
    assert derive_utt_id(a) != derive_utt_id(b)
    assert derive_utt_id(a) == derive_utt_id(a)  # deterministic


# --- Utterance.from_nemo ----------------------------------------------------------------


def test_from_nemo_fills_the_missing_fields_and_calls_back_only_when_needed() -> None:
    calls: list[str] = []

    def sha_of(path: str) -> str:
        calls.append(path)
        return "ab" * 32

    plain = Utterance.from_nemo({"audio_filepath": "a/b.wav", "duration": 2, "text": "one two"},
                                utt_id=derive_utt_id, sha256=sha_of)
    assert plain == Utterance("a/b.wav", 2.0, "one two", UNKNOWN, UNKNOWN, "a-b", "ab" * 32)
    assert calls == ["a/b.wav"]
    full = {"audio_filepath": "c.wav", "duration": 1.5, "text": "x", "speaker": "s", "group": "g",
            "utt_id": "u1", "sha256": "cd" * 32, "pred_text": "ignored"}
    assert Utterance.from_nemo(full, utt_id=derive_utt_id, sha256=sha_of) == Utterance.from_dict(full)
    assert calls == ["a/b.wav"]  # a record that has its sha256 is not hashed again


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"duration": 1.0, "text": "one"}, "audio_filepath"),
        ({"audio_filepath": "a.wav", "text": "one"}, "duration"),
        ({"audio_filepath": "a.wav", "duration": 1.0}, "text"),
        ({"audio_filepath": "a.wav", "duration": 1.0, "text": "one", "speaker": 7}, "speaker"),
    ],
)
def test_from_nemo_still_names_a_bad_field(record: dict, field: str) -> None:
    with pytest.raises(ManifestError, match=f"'{field}'"):
        Utterance.from_nemo(record, utt_id=derive_utt_id, sha256=lambda p: "0" * 64)


# --- NemoManifest ------------------------------------------------------------------------


def test_complete_relative_manifest_reads_as_the_strict_parser_does(tmp_path: Path) -> None:
    data = put(tmp_path / "golden" / "audio" / "a.wav", make_audio(seed=1))
    rec = {"audio_filepath": "audio/a.wav", "duration": 1.0, "text": "one", "speaker": "s", "group": "g",
           "utt_id": "u1", "sha256": sha256(data)}
    write_lines(tmp_path / "golden" / "manifest.jsonl", [rec])
    store = open_store(str(tmp_path))
    manifest = NemoManifest(store, "golden/manifest.jsonl")
    assert manifest.utterances() == parse_manifest(store.get_bytes("golden/manifest.jsonl"))
    assert manifest.locate("audio/a.wav") == (store, "golden/audio/a.wav")  # inside the store: as before


def test_nemo_manifest_with_absolute_paths_relative_paths_and_file_uris(tmp_path: Path) -> None:
    """Only the three NeMo fields; audio named every way a NeMo manifest may name it."""
    golden = tmp_path / "golden v1"  # a space: file:// URIs percent-encode it
    a = put(golden / "audio" / "a.wav", make_audio(seed=1))
    b = put(golden / "audio" / "b.flac", make_audio(seed=2, fmt="FLAC"))
    c = put(tmp_path / "shared" / "c.wav", make_audio(seed=3))
    d = put(tmp_path / "elsewhere" / "d.wav", make_audio(seed=4))
    write_lines(golden / "manifest.jsonl", [
        {"audio_filepath": str(golden / "audio" / "a.wav"), "duration": 1.0, "text": "one"},
        {"audio_filepath": (golden / "audio" / "b.flac").as_uri(), "duration": 1.0, "text": "two"},
        {"audio_filepath": "../shared/c.wav", "duration": 1.0, "text": "three"},  # leaves the manifest's store
        {"audio_filepath": str(tmp_path / "elsewhere" / "d.wav"), "duration": 1.0, "text": "four",
         "speaker": "kim", "group": "KR"},
    ])
    store = open_store(str(golden))  # how evaluate opens a manifest given as a local path
    manifest = NemoManifest(store, "manifest.jsonl")
    utts = manifest.utterances()
    assert [u.text for u in utts] == ["one", "two", "three", "four"]
    # written absolute or as a URI, audio inside the manifest's folder gets the id a relative path would
    assert [u.utt_id for u in utts[:2]] == ["audio-a", "audio-b"]
    assert utts[2].utt_id.endswith("shared-c") and utts[3].utt_id.endswith("elsewhere-d")
    assert len({u.utt_id for u in utts}) == 4
    assert [u.sha256 for u in utts] == [sha256(x) for x in (a, b, c, d)]  # computed from the audio bytes
    assert [(u.speaker, u.group) for u in utts] == [(UNKNOWN, UNKNOWN)] * 3 + [("kim", "KR")]
    assert [manifest.audio_bytes(u.audio_filepath) for u in utts] == [a, b, c, d]
    assert NemoManifest(store, "manifest.jsonl").utterances() == utts  # deterministic


def test_missing_audio_of_a_record_without_sha256_names_the_line(tmp_path: Path) -> None:
    write_lines(tmp_path / "m.jsonl", [{"audio_filepath": str(tmp_path / "ghost.wav"), "duration": 1.0, "text": "x"}])
    with pytest.raises(ManifestError, match=r"m.jsonl line 1: .*ghost.wav"):
        NemoManifest(open_store(str(tmp_path)), "m.jsonl").utterances()


def test_missing_audio_is_reported_when_read(tmp_path: Path) -> None:
    manifest = NemoManifest(open_store(str(tmp_path)), "m.jsonl")
    with pytest.raises(ObjectNotFound, match="ghost.wav"):
        manifest.audio_bytes("/nowhere/ghost.wav")


@pytest.mark.parametrize("path", ["https://example.com/a.wav", "s3://", "s3://bucket-only", "file://host/a.wav"])
def test_unsupported_or_empty_locations_say_what_is_accepted(tmp_path: Path, path: str) -> None:
    manifest = NemoManifest(open_store(str(tmp_path)), "m.jsonl")
    with pytest.raises(ValueError, match="audio_filepath"):
        manifest.locate(path)


def test_two_records_whose_derived_utt_ids_collide_are_refused(tmp_path: Path) -> None:
    put(tmp_path / "a.wav", make_audio(seed=1))
    put(tmp_path / "a.flac", make_audio(seed=2, fmt="FLAC"))
    write_lines(tmp_path / "m.jsonl", [{"audio_filepath": name, "duration": 1.0, "text": "x"}
                                       for name in ("a.wav", "a.flac")])
    with pytest.raises(ManifestError, match=r"line 2: the utt_id derived from its audio path, 'a', is also line 1's"):
        NemoManifest(open_store(str(tmp_path)), "m.jsonl").utterances()
