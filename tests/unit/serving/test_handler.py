"""The TorchServe handler without a server: TorchServe's own Context objects, a tiny exported model."""

from __future__ import annotations

import ast
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support.wavfactory import make_audio

from pipeline.asr.export import export_model, load_exported
from pipeline.asr.frontend import frontend_settings
from pipeline.asr.model import ASRModel
from pipeline.asr.vocab import vocab_size
from pipeline.config import FeatureConfig, ModelConfig
from pipeline.serving import handler as handler_module
from pipeline.serving.handler import ASRService

ts_context = pytest.importorskip("ts.context")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "model.pt"
    model = ASRModel(ModelConfig(d_model=64, num_layers=1), 40, vocab_size())
    export_model(model, frontend_settings(FeatureConfig(), 8000), path, {"version": "unit"})
    return path


def _model_dir(tmp_path: Path, model_file: Path, options: dict | None = None) -> Path:
    d = tmp_path / "model_dir"
    d.mkdir(exist_ok=True)
    (d / "model.pt").write_bytes(model_file.read_bytes())
    if options is not None:
        (d / "handler_config.json").write_text(json.dumps(options))
    return d


def make_context(model_dir: Path, version: str = "7"):
    manifest = {"model": {"modelName": "asr", "modelVersion": version, "serializedFile": "model.pt", "handler": "handler.py"}}
    return ts_context.Context("asr", str(model_dir), manifest, 4, None, "0.12.0")


def with_requests(ctx, content_types: list[str | None]):
    """Headers the way TorchServe's Service.retrieve_data_for_inference builds them."""
    processors = []
    for ct in content_types:
        headers = {"body": {"content-type": ct or ""}}
        if ct is not None:
            headers["Content-Type"] = ct
        processors.append(ts_context.RequestProcessor(headers))
    ctx.request_processor = processors
    return ctx


@pytest.fixture(scope="module")
def service(tmp_path_factory, model_file):
    """One initialized service for the module (as in a worker: it handles request after request)."""
    svc = ASRService()
    ctx = make_context(_model_dir(tmp_path_factory.mktemp("svc"), model_file, {"max_duration_s": 30}))
    svc.initialize(ctx)
    return svc, ctx


def call(svc: ASRService, ctx, bodies: list, content_types: list[str | None]) -> list[tuple[int, dict]]:
    with_requests(ctx, content_types)
    data = [b if isinstance(b, dict) else {"body": b} for b in bodies]
    out = svc.handle(data, ctx)
    assert isinstance(out, list) and len(out) == len(bodies)
    return [(ctx.get_response_status(i)[0], json.loads(o)) for i, o in enumerate(out)]


def test_handler_file_is_self_contained():
    tree = ast.parse(Path(handler_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "pipeline" not in imported and "ts" not in imported
    assert imported <= {"__future__", "io", "json", "logging", "math", "os", "struct", "time", "typing", "numpy", "soundfile", "torch", "torchaudio"}
    assert callable(handler_module.handle)  # TorchServe's function entry point


def test_transcribes_like_the_evaluation_path(service, model_file):
    svc, ctx = service
    audio = make_audio(1.5, 8000, 1, seed=3)
    [(status, body)] = call(svc, ctx, [audio], ["audio/wav"])
    assert status == 200
    wave, _sr = sf.read(io.BytesIO(audio), dtype="float32")
    assert body["text"] == load_exported(model_file).transcribe([wave])[0]
    assert body["model_version"] == "7" and body["model_name"] == "asr"
    assert body["duration_s"] == pytest.approx(1.5) and body["sample_rate_in"] == 8000 and body["channels"] == 1
    assert body["rtf"] > 0 and body["inference_ms"] > 0 and 0 < body["service_ms"]
    assert body["rtf"] == pytest.approx(body["service_ms"] / 1000 / 1.5, rel=1e-2)


@pytest.mark.parametrize(
    ("seconds", "sr", "channels", "fmt", "ctype"),
    [
        (1.0, 16000, 2, "WAV", "audio/wav"),
        (2.0, 22050, 1, "FLAC", "audio/flac"),
        (1.0, 44100, 2, "FLAC", "audio/x-flac"),
        (1.0, 8000, 1, "WAV", "audio/wav; codecs=1"),
        (1.0, 8000, 1, "WAV", "application/octet-stream"),
        (1.0, 8000, 1, "WAV", None),  # no Content-Type: sniffed
    ],
)
def test_any_rate_mono_or_stereo_wav_or_flac(service, seconds, sr, channels, fmt, ctype):
    svc, ctx = service
    [(status, body)] = call(svc, ctx, [make_audio(seconds, sr, channels, fmt=fmt)], [ctype])
    assert status == 200, body
    assert body["sample_rate_in"] == sr and body["channels"] == channels
    assert body["duration_s"] == pytest.approx(seconds, abs=1e-3)
    assert isinstance(body["text"], str)


def test_multipart_field(service):
    svc, ctx = service
    with_requests(ctx, ["audio/wav"])
    ctx.request_processor[0]._request_header = {"data": {"content-type": "audio/wav"}}
    out = svc.handle([{"data": bytearray(make_audio(1.0))}], ctx)
    assert ctx.get_response_status(0)[0] == 200 and "text" in json.loads(out[0])


def _nan_wav() -> bytes:
    x = np.zeros((8000, 1), dtype=np.float32)
    x[100] = np.nan
    return make_audio(samples=x, subtype="FLOAT")


HOSTILE = {
    "empty body": (b"", "audio/wav", 400, "empty_body"),
    "non-audio bytes": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "audio/wav", 415, "unsupported_format"),
    "text with audio type": (b"hello world, this is not audio", "audio/wav", 415, "unsupported_format"),
    "wrong content type": (make_audio(1.0), "text/plain", 415, "unsupported_media_type"),
    "json content type": (make_audio(1.0), "application/json", 415, "unsupported_media_type"),
    "truncated wav": (make_audio(2.0)[: 44 + 3000], "audio/wav", 400, "truncated_audio"),
    "header only wav": (make_audio(2.0)[:44], "audio/wav", 400, "truncated_audio"),
    "riff without chunks": (b"RIFF\x00\x00\x00\x00WAVE", "audio/wav", 400, "truncated_audio"),
    "corrupt flac": (b"fLaC" + b"\x00" * 200, "audio/flac", 400, "undecodable_audio"),
    "nan samples": (_nan_wav(), "audio/wav", 400, "non_finite_samples"),
    "too long": (make_audio(31.0, 8000), "audio/wav", 413, "too_long"),
    "too short": (make_audio(0.01, 8000), "audio/wav", 400, "too_short"),
    "too many channels": (make_audio(0.5, 8000, 12), "audio/wav", 400, "bad_channels"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_input_is_4xx_with_a_message(service, case):
    svc, ctx = service
    body, ctype, want_status, want_code = HOSTILE[case]
    [(status, resp)] = call(svc, ctx, [body], [ctype])
    assert status == want_status, resp
    assert resp["error"] == want_code and resp["status"] == want_status and resp["message"]
    assert ctx.get_response_content_type(0) == "application/json"
    # the service keeps serving
    [(status, resp)] = call(svc, ctx, [make_audio(1.0)], ["audio/wav"])
    assert status == 200 and "text" in resp


def test_decoded_json_body_is_415(service):
    svc, ctx = service
    with_requests(ctx, ["application/json"])
    out = svc.handle([{"body": {"audio": "nope"}}], ctx)
    assert ctx.get_response_status(0)[0] == 415 and json.loads(out[0])["error"] == "unsupported_media_type"


def test_too_many_bytes_is_413(tmp_path, model_file):
    svc = ASRService()
    ctx = make_context(_model_dir(tmp_path, model_file, {"max_bytes": 20000}))
    svc.initialize(ctx)
    [(status, resp)] = call(svc, ctx, [make_audio(2.0)], ["audio/wav"])
    assert status == 413 and resp["error"] == "too_large"


def test_batch_mixes_good_and_bad_requests(service):
    svc, ctx = service
    bodies = [make_audio(1.0, seed=1), b"", make_audio(2.0, 16000, 2, seed=2), b"garbage-bytes-garbage"]
    results = call(svc, ctx, bodies, ["audio/wav", "audio/wav", "audio/wav", "audio/wav"])
    assert [s for s, _ in results] == [200, 400, 200, 415]
    assert results[0][1]["batch_size"] == 2 and results[2][1]["batch_size"] == 2
    single = call(svc, ctx, [bodies[2]], ["audio/wav"])[0][1]
    assert single["text"] == results[2][1]["text"]  # padding in a batch does not change the transcript


def test_function_entry_point_initializes(tmp_path, model_file, monkeypatch):
    fresh = ASRService()
    monkeypatch.setattr(handler_module, "_service", fresh)
    ctx = make_context(_model_dir(tmp_path, model_file))
    assert handler_module.handle(None, ctx) is None and fresh.initialized
    with_requests(ctx, ["audio/wav"])
    assert json.loads(handler_module.handle([{"body": make_audio(1.0)}], ctx)[0])["model_version"] == "7"


def test_unknown_option_fails_at_load(tmp_path, model_file):
    with pytest.raises(ValueError, match="unknown option"):
        ASRService().initialize(make_context(_model_dir(tmp_path, model_file, {"max_duraton_s": 3})))


def test_fault_injection_failure_is_a_500_and_the_worker_survives(tmp_path, model_file):
    svc = ASRService()
    ctx = make_context(_model_dir(tmp_path, model_file, {"fail_above_s": 1.5}))
    svc.initialize(ctx)
    results = call(svc, ctx, [make_audio(2.0), b""], ["audio/wav", "audio/wav"])
    assert results[0][0] == 500 and results[0][1]["error"] == "model_error"
    assert results[1][0] == 400  # bad input stays a 4xx even in a failing batch
    [(status, _)] = call(svc, ctx, [make_audio(1.0)], ["audio/wav"])
    assert status == 200


def test_fault_injection_delay(tmp_path, model_file):
    svc = ASRService()
    ctx = make_context(_model_dir(tmp_path, model_file, {"delay_ms": 200}))
    svc.initialize(ctx)
    start = time.perf_counter()
    [(status, body)] = call(svc, ctx, [make_audio(1.0)], ["audio/wav"])
    assert status == 200 and time.perf_counter() - start >= 0.2 and body["inference_ms"] >= 200 and body["service_ms"] >= 200
