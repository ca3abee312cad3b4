"""``asr-retune transcribe --model`` takes what ``evaluate`` takes, against a real ``mlflow server``.

A tiny exported model (``babble``: every utterance decodes as "e e e ...", so transcripts are
not empty) is registered and promoted the way the pipeline does it; ``transcribe`` with
``models:/NAME@production``, ``models:/NAME/1``, the run's model under ROOT and the model file
must print the same transcripts.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from support.model_factory import export_tiny
from support.registry_env import put_candidate, registry_config
from support.wavfactory import make_audio

from pipeline import tracking
from pipeline.cli import build_parser, main
from pipeline.run import RunContext
from pipeline.stages.register import register
from pipeline.storage import sha256_file

pytestmark = pytest.mark.integration

RUN = "week-07"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_started):
    """A store holding run RUN's candidate, registered as version 1 of a model of its own, alias production."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _register(tmp_path_factory.mktemp("transcribe"), mlflow_started, monkeypatch)


def _register(tmp_path, mlflow_started, monkeypatch) -> dict:
    model = export_tiny(tmp_path / "babble.pt", "babble")
    wavs = []
    for i, seconds in enumerate((0.6, 1.4)):
        path = tmp_path / f"utt-{i}.wav"
        path.write_bytes(make_audio(seconds=seconds, seed=i))
        wavs.append(str(path))
    url = mlflow_started.wait_ready()
    monkeypatch.setenv("ASR_RETUNE_ACTOR", "pytest")
    monkeypatch.delenv("ASR_RETUNE_CONFIG", raising=False)
    name = f"asr-{uuid.uuid4().hex[:8]}"
    config = registry_config(url, tmp_path / "model-cache", name=name)
    root = tmp_path / "store"
    ctx = RunContext.create(config, run_id=RUN, root=str(root))
    put_candidate(ctx, model)
    key = ctx.stage_key("train", "model.pt")
    ctx.store.put_text(ctx.stage_key("gate", "decision.json"), json.dumps({
        "passed": True, "forced": False, "cold_start": True, "mode": "improve", "failing_rules": [], "rules": [],
        "candidate": {"key": key, "sha256": sha256_file(model), "wer": 0.1},
        "golden": {"version": "v1"}, "production": None,
    }))
    assert register(ctx)["version"] == "1"
    tracking.promote(ctx, "1", reason="transcribe test")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"audio": {"sample_rate": 8000}, "storage": {"root": str(root)},
                                           "mlflow": config.mlflow.model_dump(mode="json")}), encoding="utf-8")
    return {"name": name, "model": model, "wavs": wavs, "config": str(config_file), "key": key}


def transcribe(capsys, env: dict, model: str) -> list[dict]:
    capsys.readouterr()
    code = main(["transcribe", "--config", env["config"], "--json", "--model", model, *env["wavs"]])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == model
    return result["transcripts"]


def test_transcribe_takes_registry_uris_a_runs_model_and_a_file(registered, capsys) -> None:
    name = registered["name"]
    from_file = transcribe(capsys, registered, str(registered["model"]))
    assert [t["file"] for t in from_file] == registered["wavs"]
    assert all(t["text"].startswith("e e") for t in from_file)  # babble: not an empty transcript
    assert len(from_file[1]["text"]) > len(from_file[0]["text"])  # the longer utterance babbles longer
    for ref in (f"models:/{name}@production", f"models:/{name}/1", registered["key"]):
        assert transcribe(capsys, registered, ref) == from_file, ref


def test_transcribe_names_a_missing_alias_and_a_missing_model(registered, capsys) -> None:
    capsys.readouterr()
    assert main(["transcribe", "--config", registered["config"], "--model",
                 f"models:/{registered['name']}@nosuch", *registered["wavs"]]) == 1
    assert "no alias 'nosuch'" in capsys.readouterr().err
    assert main(["transcribe", "--config", registered["config"], "--model", "runs/nosuch/train/model.pt",
                 *registered["wavs"]]) == 1
    err = capsys.readouterr().err
    assert "model not found: runs/nosuch/train/model.pt" in err and "models:/" in err


def test_transcribe_and_evaluate_share_the_model_option() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {name: next(a.help for a in sub.choices[name]._actions if "--model" in a.option_strings)
             for name in ("evaluate", "transcribe")}
    assert helps["evaluate"] == helps["transcribe"]
    assert "models:/asr@production" in helps["transcribe"] and "runs/RUN_ID/train/model.pt" in helps["transcribe"]


def test_evaluate_takes_a_runs_model_under_root(registered, tmp_path, capsys) -> None:
    """The same references work for evaluate: here the run's model, as a key under ROOT."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio_filepath": w, "duration": d, "text": "one two"}) + "\n"
                                for w, d in zip(registered["wavs"], (0.6, 1.4))), encoding="utf-8")
    results = []
    for ref in (registered["key"], f"models:/{registered['name']}@production", str(registered["model"])):
        capsys.readouterr()
        assert main(["evaluate", "--config", registered["config"], "--json", "--model", ref,
                     "--manifest", str(manifest)]) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out)
        results.append((out["wer"], out["n_words"]))
    assert results[0] == results[1] == results[2] and results[0][0] > 0
