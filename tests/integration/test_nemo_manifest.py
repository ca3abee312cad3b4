"""``asr-retune ingest`` and ``asr-retune evaluate`` on manifests as NeMo writes them.

A plain NeMo manifest holds only ``audio_filepath``, ``duration`` and ``text``; its paths may be
absolute, relative to the manifest, or ``file://``/``s3://`` URIs. Ingest accepts absolute paths
and URIs only inside the drop's own folder (``path_escape`` otherwise); evaluate reads any of
them. The S3 cases run against moto's real S3 server.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import boto3
import pytest
from support.dropfactory import s3_credentials
from support.model_factory import export_tiny
from support.wavfactory import make_audio, sha256

from pipeline.asr.evaluation import evaluate_model
from pipeline.asr.export import load_exported
from pipeline.cli import main
from pipeline.data.pool import read_pool
from pipeline.storage import open_store

pytestmark = pytest.mark.integration

TEXTS = ["four one five", "seven three", "nine nine two one", "zero"]
SECONDS = [0.8, 1.3, 2.1, 0.5]


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.delenv("ASR_RETUNE_CONFIG", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text("audio:\n  sample_rate: 8000\nstorage:\n  root: unused-store\n", encoding="utf-8")
    return path


def cli_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json", "--quiet"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def nemo_lines(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


def audio_files() -> list[bytes]:
    return [make_audio(seconds=s, seed=i) for i, s in enumerate(SECONDS)]


# --- ingest ------------------------------------------------------------------------------


def put_nemo_drop(root: Path, drop_id: str, audio: list[bytes], outside: Path) -> list[dict]:
    """A drop whose manifest names its audio by absolute path (and one by file:// URI), plus one
    absolute path outside the drop."""
    folder = root / "incoming" / drop_id
    (folder / "audio").mkdir(parents=True)
    records = []
    for i, (data, seconds, text) in enumerate(zip(audio, SECONDS, TEXTS)):
        path = folder / "audio" / f"{i:04d}.wav"
        path.write_bytes(data)
        name = path.as_uri() if i == 3 else str(path)
        records.append({"audio_filepath": name, "duration": seconds, "text": text})
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(make_audio(seconds=1.0, seed=99))
    records.append({"audio_filepath": str(outside), "duration": 1.0, "text": "one"})
    (folder / "manifest.jsonl").write_bytes(nemo_lines(records))  # the manifest last
    return records


def test_ingest_plain_nemo_manifest_with_absolute_paths(tmp_path, config_file, capsys) -> None:
    root = tmp_path / "store"
    audio = audio_files()
    outside = tmp_path / "elsewhere" / "x.wav"
    put_nemo_drop(root, "week-01", audio, outside)

    summary = cli_json(capsys, "ingest", "--config", str(config_file), "--root", str(root), "--run-id", "nemo-1")
    assert summary["lines_read"] == 5 and summary["accepted"] == 4 and summary["unparseable_lines"] == 0
    [escape] = summary["quarantined"]
    assert escape["reason"] == "path_escape" and escape["line"] == 5 and escape["utt_id"] is None
    assert repr(str(outside)) in escape["message"] and "outside this drop's folder" in escape["message"]

    pool = read_pool(open_store(str(root)))
    assert [u.utt_id for u in pool.utterances] == [f"week-01:audio-{i:04d}" for i in range(4)]
    for u, data, text in zip(pool.utterances, audio, TEXTS):
        assert (u.speaker, u.group, u.drop, u.text) == ("unknown", "unknown", "week-01", text)
        assert u.sha256 == sha256(data)  # computed from the original bytes
        assert u.audio_filepath == f"../../audio/{u.sha256[:2]}/{u.sha256}.wav"  # the internal record, as always
        assert (root / "state" / "audio" / u.sha256[:2] / f"{u.sha256}.wav").is_file()


def test_reingesting_the_same_nemo_manifest_is_idempotent(tmp_path, config_file, capsys) -> None:
    """The derived utt_ids are stable: the same drop gives the same pool version; the same audio in a
    later drop is a duplicate."""
    audio = audio_files()
    versions = []
    for name in ("a", "b"):
        root = tmp_path / name
        put_nemo_drop(root, "week-01", audio, tmp_path / "elsewhere" / "x.wav")
        versions.append(cli_json(capsys, "ingest", "--config", str(config_file), "--root", str(root),
                                 "--run-id", "r1")["pool_version"])
    assert versions[0] == versions[1]
    root = tmp_path / "a"
    (root / "incoming" / "week-02").mkdir(parents=True)
    copied = root / "incoming" / "week-02" / "again.wav"
    shutil.copyfile(root / "incoming" / "week-01" / "audio" / "0000.wav", copied)
    (root / "incoming" / "week-02" / "manifest.jsonl").write_bytes(
        nemo_lines([{"audio_filepath": str(copied), "duration": SECONDS[0], "text": TEXTS[0]}]))
    summary = cli_json(capsys, "ingest", "--config", str(config_file), "--root", str(root), "--run-id", "r2")
    [dup] = summary["quarantined"]
    assert dup["reason"] == "duplicate_audio" and dup["utt_id"] == "week-02:again"
    assert dup["duplicate_of"] == {"utt_id": "week-01:audio-0000", "drop": "week-01"}


# --- evaluate ----------------------------------------------------------------------------


def write_golden(folder: Path, audio: list[bytes]) -> tuple[Path, Path]:
    """The same audio under two manifests: a complete one (relative paths, every field) and a plain
    NeMo one (absolute paths, only audio_filepath, duration and text)."""
    (folder / "audio").mkdir(parents=True)
    full, plain = [], []
    for i, (data, seconds, text) in enumerate(zip(audio, SECONDS, TEXTS)):
        path = folder / "audio" / f"{i:04d}.wav"
        path.write_bytes(data)
        full.append({"audio_filepath": f"audio/{i:04d}.wav", "duration": seconds, "text": text,
                     "speaker": f"spk{i % 2}", "group": "USA/neutral", "utt_id": f"g-{i}", "sha256": sha256(data)})
        plain.append({"audio_filepath": str(path), "duration": seconds, "text": text})
    (folder / "full.jsonl").write_bytes(nemo_lines(full))
    (folder / "nemo.jsonl").write_bytes(nemo_lines(plain))
    return folder / "full.jsonl", folder / "nemo.jsonl"


@pytest.fixture(scope="module")
def babble(tmp_path_factory) -> Path:
    """A tiny model that decodes every utterance as 'e e e ...' (errors grow with the duration)."""
    return export_tiny(tmp_path_factory.mktemp("models") / "babble.pt", "babble")


SCORES = ("wer", "cer", "n_utts", "n_words", "nonfinite_utts", "audio_seconds")


def test_evaluate_plain_nemo_manifest_with_absolute_paths(tmp_path, config_file, babble, capsys) -> None:
    full, plain = write_golden(tmp_path / "golden", audio_files())
    args = ("evaluate", "--config", str(config_file), "--model", str(babble))
    want = cli_json(capsys, *args, "--manifest", str(full))
    got = cli_json(capsys, *args, "--manifest", str(plain))
    assert want["wer"] > 1.0 and want["n_utts"] == 4  # babble: insertions on every utterance
    assert {k: got[k] for k in SCORES} == {k: want[k] for k in SCORES}
    assert got["per_group"] == {
        "group:unknown": {"n_utts": 4, "n_words": want["n_words"], "wer": want["wer"]},
        "speaker:unknown": {"n_utts": 4, "n_words": want["n_words"], "wer": want["wer"]},
    }
    # per utterance: the same errors, under ids derived from the audio paths
    model = load_exported(babble)
    store = open_store(str(tmp_path / "golden"))
    by_path = evaluate_model(model, store, "nemo.jsonl").utts
    by_id = evaluate_model(model, store, "full.jsonl").utts
    assert [u.utt_id for u in by_path] == [f"audio-{i:04d}" for i in range(4)]
    assert [u.errors for u in by_path] == [u.errors for u in by_id] and all(u.errors > 0 for u in by_id)


def test_evaluate_reads_paths_relative_to_the_manifest_and_file_uris(tmp_path, config_file, babble, capsys) -> None:
    audio = audio_files()
    full, _ = write_golden(tmp_path / "golden", audio)
    lists = tmp_path / "lists" / "week-01"  # a manifest kept apart from its audio
    lists.mkdir(parents=True)
    lines = [{"audio_filepath": f"../../golden/audio/{i:04d}.wav", "duration": s, "text": t}
             for i, (s, t) in enumerate(zip(SECONDS, TEXTS))]
    lines[1]["audio_filepath"] = (tmp_path / "golden" / "audio" / "0001.wav").as_uri()
    (lists / "manifest.jsonl").write_bytes(nemo_lines(lines))
    args = ("evaluate", "--config", str(config_file), "--model", str(babble))
    want = cli_json(capsys, *args, "--manifest", str(full))
    got = cli_json(capsys, *args, "--manifest", str(lists / "manifest.jsonl"))
    assert {k: got[k] for k in SCORES} == {k: want[k] for k in SCORES}


def test_evaluate_refuses_what_it_cannot_read_and_says_which_line(tmp_path, config_file, babble, capsys) -> None:
    (tmp_path / "m.jsonl").write_bytes(nemo_lines([{"audio_filepath": "/nowhere/a.wav", "duration": 1, "text": "x"}]))
    code = main(["evaluate", "--config", str(config_file), "--model", str(babble), "--manifest",
                 str(tmp_path / "m.jsonl")])
    err = capsys.readouterr().err
    assert code == 1 and "m.jsonl line 1" in err and "/nowhere/a.wav" in err


# --- S3 (moto) ---------------------------------------------------------------------------


@pytest.fixture
def s3(moto_server, monkeypatch):
    """Two fresh buckets on moto's server; the CLI reaches it through the environment override."""
    with s3_credentials():
        monkeypatch.setenv("ASR_RETUNE__STORAGE__S3_ENDPOINT_URL", moto_server)
        client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
        buckets = [f"nemo-{uuid.uuid4().hex[:10]}" for _ in range(2)]
        for b in buckets:
            client.create_bucket(Bucket=b)
        yield client, buckets


def test_s3_uris_in_an_ingested_drop_and_an_evaluated_manifest(s3, tmp_path, config_file, babble, capsys) -> None:
    client, (bucket, other) = s3
    audio = audio_files()
    drop = "pfx/incoming/week-01"
    records = []
    for i, (data, seconds, text) in enumerate(zip(audio, SECONDS, TEXTS)):
        client.put_object(Bucket=bucket, Key=f"{drop}/audio/{i}.wav", Body=data)
        records.append({"audio_filepath": f"s3://{bucket}/{drop}/audio/{i}.wav", "duration": seconds, "text": text})
    client.put_object(Bucket=other, Key="x.wav", Body=audio[0])
    records.append({"audio_filepath": f"s3://{other}/x.wav", "duration": SECONDS[0], "text": TEXTS[0]})
    client.put_object(Bucket=bucket, Key=f"{drop}/manifest.jsonl", Body=nemo_lines(records))

    summary = cli_json(capsys, "ingest", "--config", str(config_file), "--root", f"s3://{bucket}/pfx",
                       "--run-id", "s3-nemo")
    assert summary["accepted"] == 4 and summary["lines_read"] == 5
    [escape] = summary["quarantined"]
    assert escape["reason"] == "path_escape" and f"s3://{other}/x.wav" in escape["message"]

    # evaluate: a manifest in one bucket naming audio in both, by s3:// URI and by a relative path
    lines = [dict(r) for r in records[:4]]
    lines[2]["audio_filepath"] = "../incoming/week-01/audio/2.wav"
    lines[0]["audio_filepath"] = f"s3://{other}/x.wav"  # the same bytes as audio/0.wav
    client.put_object(Bucket=bucket, Key="pfx/golden/manifest.jsonl", Body=nemo_lines(lines))
    full, _ = write_golden(tmp_path / "golden", audio)
    args = ("evaluate", "--config", str(config_file), "--model", str(babble))
    want = cli_json(capsys, *args, "--manifest", str(full))
    got = cli_json(capsys, *args, "--manifest", f"s3://{bucket}/pfx/golden/manifest.jsonl")
    assert {k: got[k] for k in SCORES} == {k: want[k] for k in SCORES}
