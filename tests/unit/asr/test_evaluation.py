"""load_model: the one way evaluate and transcribe resolve a model reference (registry URIs are
tested against a real mlflow server in tests/integration/test_transcribe_registry.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.model_factory import export_tiny

from pipeline.asr.evaluation import load_model
from pipeline.storage import open_store


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("m") / "babble.pt", "babble", seed=3)


def test_a_file_a_file_uri_and_a_key_under_the_root_load_the_same_model(tmp_path, model_file) -> None:
    spaced = tmp_path / "my models" / "model.pt"
    spaced.parent.mkdir()
    shutil.copyfile(model_file, spaced)
    store = open_store(str(tmp_path / "store"))
    store.upload_file("runs/week-01/train/model.pt", model_file)
    refs = [str(model_file), spaced.as_uri(), "runs/week-01/train/model.pt", store.uri("runs/week-01/train/model.pt")]
    metas = [load_model(ref, store).meta for ref in refs]
    assert metas[0]["kind"] == "babble" and metas[0]["seed"] == 3
    assert all(m == metas[0] for m in metas)


def test_a_missing_model_says_what_a_reference_may_be(tmp_path) -> None:
    store = open_store(str(tmp_path))
    for ref in ("runs/nosuch/train/model.pt", "/nowhere/model.pt", "../escape.pt", "file:///nowhere/model.pt"):
        with pytest.raises(FileNotFoundError, match=r"model not found: .*models:/NAME@ALIAS.*runs/RUN_ID/train/model.pt"):
            load_model(ref, store)


def test_a_malformed_registry_uri_is_refused_before_any_server_is_asked() -> None:
    with pytest.raises(ValueError, match="not a registry URI"):
        load_model("models:/asr")
