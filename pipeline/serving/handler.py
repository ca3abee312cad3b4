"""TorchServe handler for an exported asr-retune model: audio bytes in, JSON transcript out.

Self-contained on purpose: this file is packaged into the ``.mar`` with ``--handler`` and
imports nothing from ``pipeline`` (only the standard library, numpy, soundfile and torch /
torchaudio), so the serving host needs no training code and the server can be swapped.

Request: the body is one WAV or FLAC file (any sample rate, mono or stereo; multipart
form fields ``data``/``file``/``audio`` are accepted too) with ``Content-Type`` one of
:data:`AUDIO_CONTENT_TYPES` (or none: then the bytes are sniffed).

Response (200, ``application/json``)::

    {"text": "four one five", "model_version": "3", "model_name": "asr",
     "duration_s": 1.52, "sample_rate_in": 16000, "channels": 2,
     "service_ms": 2.6, "inference_ms": 4.1, "rtf": 0.0017, "batch_size": 2}

``service_ms`` is this request's share of the worker's time: its own decoding + resampling
plus the batch's inference time divided by the batch size (queueing excluded, so it compares
versions fairly whatever traffic share each gets); ``inference_ms`` is the whole batch's
model time; ``rtf`` = ``service_ms`` / audio duration.

Bad input never reaches the model and never costs a worker: it is answered per request
with a 4xx JSON body ``{"error": "<code>", "message": "...", "status": 4xx}``
(400 undecodable / truncated / NaN / too short, 413 too large or too long,
415 wrong content type or not WAV/FLAC). A failure *of the model* on valid input is a
500 with ``{"error": "model_error", ...}`` for the requests of that batch, so a broken
model shows up as server errors to the router and the canary analysis.

Options come from ``handler_config.json`` in the archive (extra file), all optional:

``max_bytes`` (10 MiB), ``max_duration_s`` (30), ``min_duration_s`` (0.1),
``max_channels`` (8), ``min_sample_rate`` (4000), ``max_sample_rate`` (192000),
``torch_threads`` (1), ``warmup_runs`` (2: TorchScript's profiling executor optimizes on the
first calls; warming up at load keeps a fresh version's first requests from looking slow).

Test / fault-injection knobs, never set in production archives (the canary tests use
them to build deliberately bad candidates): ``delay_ms`` sleeps that long per batch
(a slow model); ``fail_above_s`` makes the *model step* raise for any input longer than
that many seconds (a model that fails on some inputs -> 500).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
import time
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

logger = logging.getLogger(__name__)

HANDLER_CONFIG = "handler_config.json"
META = "meta.json"
DEFAULT_MODEL_FILE = "model.pt"
AUDIO_CONTENT_TYPES = (
    "audio/wav",
    "audio/wave",
    "audio/x-wav",
    "audio/vnd.wave",
    "audio/flac",
    "audio/x-flac",
    "application/octet-stream",
)
BODY_FIELDS = ("body", "data", "file", "audio")
DEFAULTS: dict[str, Any] = {
    "max_bytes": 10 * 1024 * 1024,
    "max_duration_s": 30.0,
    "min_duration_s": 0.1,
    "max_channels": 8,
    "min_sample_rate": 4000,
    "max_sample_rate": 192000,
    "torch_threads": 1,
    "warmup_runs": 2,
    "delay_ms": 0,
    "fail_above_s": None,
}


class BadRequest(Exception):
    """Invalid client input: answered with ``status`` and a JSON message, the model is not run."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "status": self.status}


class InjectedFault(RuntimeError):
    """Raised by the ``fail_above_s`` fault-injection knob (tests only)."""


def _header(context: Any, idx: int, name: str) -> str | None:
    """A request header (case-insensitive) from TorchServe's per-request properties."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except Exception:  # noqa: BLE001 - no request processor (e.g. a bare context)
        return None
    wanted = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None


def _part_content_type(context: Any, idx: int, field: str) -> str | None:
    """The content type TorchServe recorded for one input parameter (raw body or form field)."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except Exception:  # noqa: BLE001
        return None
    entry = headers.get(field)
    if isinstance(entry, dict):
        value = entry.get("content-type")
        return value if isinstance(value, str) else None
    return None


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _sniff(data: bytes) -> str | None:
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    return None


def _check_wav_chunks(data: bytes) -> None:
    """Walk the RIFF chunks: a ``data`` chunk that claims more bytes than present is truncation."""
    if data[:4] != b"RIFF":
        return  # RF64 keeps its sizes elsewhere; libsndfile's frame count check covers it
    pos, seen_fmt = 12, False
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk == b"fmt ":
            seen_fmt = True
        if chunk == b"data":
            if not seen_fmt:
                raise BadRequest(400, "invalid_audio", "WAV data chunk before its fmt chunk")
            available = len(data) - pos - 8
            if size != 0xFFFFFFFF and size > available:
                raise BadRequest(
                    400,
                    "truncated_audio",
                    f"truncated WAV: the data chunk declares {size} bytes but only {available} are present",
                )
            return
        pos += 8 + size + (size & 1)
    raise BadRequest(400, "truncated_audio", "WAV has no complete data chunk (truncated or not a WAV file)")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if value is None:
        return b""
    # TorchServe decoded a JSON body into an object: certainly not audio
    raise BadRequest(415, "unsupported_media_type", "the body must be WAV or FLAC bytes, not JSON")


class ASRService:
    """Decode + validate + resample + batch inference + greedy CTC decoding."""

    def __init__(self) -> None:
        self.initialized = False
        self.module: torch.jit.ScriptModule | None = None
        self.meta: dict[str, Any] = {}
        self.options: dict[str, Any] = dict(DEFAULTS)
        self.model_version = "unknown"
        self.model_name = "asr"

    # -- lifecycle --------------------------------------------------------------------
    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = props.get("model_dir") or "."
        manifest = getattr(context, "manifest", None) or {}
        model_info = manifest.get("model", {}) if isinstance(manifest, dict) else {}
        model_file = model_info.get("serializedFile") or DEFAULT_MODEL_FILE
        path = os.path.join(model_dir, model_file)
        options_path = os.path.join(model_dir, HANDLER_CONFIG)
        if os.path.exists(options_path):
            with open(options_path, encoding="utf-8") as f:
                loaded = json.load(f)
            unknown = sorted(set(loaded) - set(DEFAULTS))
            if unknown:
                raise ValueError(f"{HANDLER_CONFIG}: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
            self.options.update(loaded)
        torch.set_num_threads(max(1, int(self.options["torch_threads"])))
        extra = {META: ""}
        self.module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
        self.module.eval()
        if not extra[META]:
            raise ValueError(f"{path} has no {META}: not an asr-retune export")
        self.meta = json.loads(extra[META])
        self.tokens: list[str] = list(self.meta["tokens"])
        self.blank = int(self.meta.get("blank", 0))
        self.sample_rate = int(self.meta["sample_rate"])
        n_fft = int(self.meta.get("frontend", {}).get("n_fft", 0))
        # the STFT's reflect padding needs more than n_fft/2 samples; keep a margin
        self.min_samples = max(n_fft, int(math.ceil(float(self.options["min_duration_s"]) * self.sample_rate)), 1)
        self.model_version = str(model_info.get("modelVersion") or self.meta.get("version") or "unknown")
        self.model_name = str(getattr(context, "model_name", None) or model_info.get("modelName") or "asr")
        self._warm_up(int(self.options["warmup_runs"]))
        self.initialized = True
        logger.info("asr handler ready: %s version %s, options %s", self.model_name, self.model_version, self.options)

    @torch.inference_mode()
    def _warm_up(self, runs: int) -> None:
        gen = torch.Generator().manual_seed(0)
        for i in range(max(0, runs)):
            n = self.sample_rate * (1 + 2 * (i % 2))
            wave = 0.01 * torch.randn(1, n, generator=gen)
            self.module(wave, torch.tensor([n]))

    # -- input --------------------------------------------------------------------------
    def _payload(self, request: Any, context: Any, idx: int) -> tuple[bytes, str | None]:
        if not isinstance(request, dict):
            return _as_bytes(request), _header(context, idx, "content-type")
        for field in BODY_FIELDS:
            if field in request:
                ctype = _part_content_type(context, idx, field) or _header(context, idx, "content-type")
                return _as_bytes(request[field]), ctype
        for field, value in request.items():  # any other single form field
            if isinstance(value, (bytes, bytearray)):
                return bytes(value), _part_content_type(context, idx, field)
        return b"", _header(context, idx, "content-type")

    def decode(self, data: bytes, content_type: str | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Validate and decode one request body to a mono waveform at the model's rate."""
        opts = self.options
        if not data:
            raise BadRequest(400, "empty_body", "empty request body: send WAV or FLAC bytes")
        if len(data) > int(opts["max_bytes"]):
            raise BadRequest(413, "too_large", f"body is {len(data)} bytes; the limit is {int(opts['max_bytes'])}")
        media = _media_type(content_type)
        if media and media not in AUDIO_CONTENT_TYPES:
            raise BadRequest(
                415,
                "unsupported_media_type",
                f"Content-Type {media!r} is not accepted; use one of {', '.join(AUDIO_CONTENT_TYPES)}",
            )
        kind = _sniff(data)
        if kind is None:
            raise BadRequest(415, "unsupported_format", "the body is not a WAV or FLAC file (unknown magic bytes)")
        if kind == "wav":
            _check_wav_chunks(data)
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                sr, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
                if not int(opts["min_sample_rate"]) <= sr <= int(opts["max_sample_rate"]):
                    raise BadRequest(
                        400,
                        "bad_sample_rate",
                        f"sample rate {sr} Hz is outside [{opts['min_sample_rate']}, {opts['max_sample_rate']}]",
                    )
                if not 1 <= channels <= int(opts["max_channels"]):
                    raise BadRequest(400, "bad_channels", f"{channels} channels; at most {opts['max_channels']}")
                limit_s = float(opts["max_duration_s"])
                max_frames = int(limit_s * sr)
                if frames > max_frames:
                    raise BadRequest(413, "too_long", f"audio is {frames / sr:.2f} s long; the limit is {limit_s:g} s")
                # never decode more than the limit allows, whatever the header claims (compressed "bombs")
                samples = f.read(frames=frames if frames > 0 else max_frames + 1, dtype="float32", always_2d=True)
        except BadRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - libsndfile errors: the bytes are bad, not the server
            raise BadRequest(400, "undecodable_audio", f"cannot decode {kind.upper()} audio: {exc}") from None
        if samples.shape[0] > max_frames:
            raise BadRequest(413, "too_long", f"audio is longer than the limit of {limit_s:g} s")
        if samples.shape[0] < frames:
            raise BadRequest(
                400, "truncated_audio", f"truncated {kind.upper()}: header says {frames} frames, only {samples.shape[0]} decoded"
            )
        if samples.shape[0] == 0:
            raise BadRequest(400, "no_samples", "the audio holds no samples")
        if not np.isfinite(samples).all():
            raise BadRequest(400, "non_finite_samples", "the audio holds NaN or infinite samples")
        wave = torch.from_numpy(np.ascontiguousarray(samples.T)).mean(dim=0)
        if sr != self.sample_rate:
            wave = AF.resample(wave, orig_freq=sr, new_freq=self.sample_rate)
        duration = samples.shape[0] / sr
        if wave.numel() < self.min_samples:
            raise BadRequest(
                400,
                "too_short",
                f"audio is {duration:.3f} s long; at least {self.min_samples / self.sample_rate:.3f} s is needed",
            )
        return wave.contiguous(), {"duration_s": round(duration, 4), "sample_rate_in": sr, "channels": channels}

    # -- model --------------------------------------------------------------------------
    def _ctc_decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        best = log_probs.argmax(dim=-1).tolist()
        texts = []
        for ids, n in zip(best, lengths.tolist()):
            out, prev = [], -1
            for i in ids[:n]:
                if i != prev and i != self.blank:
                    out.append(self.tokens[i])
                prev = i
            texts.append(" ".join("".join(out).split()))
        return texts

    @torch.inference_mode()
    def infer(self, waves: list[torch.Tensor], durations: list[float]) -> list[str]:
        """Run the model on a batch of mono waveforms at the model's sample rate."""
        delay = float(self.options.get("delay_ms") or 0)
        if delay > 0:
            time.sleep(delay / 1000.0)
        limit = self.options.get("fail_above_s")
        if limit is not None and any(d > float(limit) for d in durations):
            raise InjectedFault(f"fault injection: input longer than {limit} s")
        lengths = torch.tensor([w.numel() for w in waves])
        batch = torch.zeros(len(waves), int(lengths.max()))
        for i, w in enumerate(waves):
            batch[i, : w.numel()] = w
        log_probs, out_lengths = self.module(batch, lengths)
        return self._ctc_decode(log_probs, out_lengths)

    # -- TorchServe entry ---------------------------------------------------------------
    def handle(self, data: list[Any] | None, context: Any) -> list[str] | None:
        if data is None:  # TorchServe's function entry point calls handle(None, ctx) to initialize
            if not self.initialized:
                self.initialize(context)
            return None
        responses: list[dict[str, Any] | None] = [None] * len(data)
        statuses = [200] * len(data)
        valid: list[tuple[int, torch.Tensor, dict[str, Any]]] = []
        for idx, request in enumerate(data):
            try:
                started = time.perf_counter()
                body, ctype = self._payload(request, context, idx)
                wave, info = self.decode(body, ctype)
                info["_decode_s"] = time.perf_counter() - started
                valid.append((idx, wave, info))
            except BadRequest as exc:
                responses[idx], statuses[idx] = exc.body(), exc.status
            except Exception as exc:  # noqa: BLE001 - an unexpected input problem is still the input's
                logger.warning("request %d rejected: %s", idx, exc, exc_info=True)
                bad = BadRequest(400, "invalid_input", f"cannot process the request: {type(exc).__name__}: {exc}")
                responses[idx], statuses[idx] = bad.body(), bad.status
        if valid:
            start = time.perf_counter()
            try:
                texts = self.infer([w for _, w, _ in valid], [i["duration_s"] for _, _, i in valid])
            except Exception as exc:  # noqa: BLE001 - the model failed on valid input: a server error
                logger.error("model failed on a batch of %d: %s", len(valid), exc, exc_info=True)
                for idx, _, _ in valid:
                    responses[idx] = {"error": "model_error", "message": f"{type(exc).__name__}: {exc}", "status": 500}
                    statuses[idx] = 500
            else:
                elapsed = time.perf_counter() - start
                for (idx, _, info), text in zip(valid, texts):
                    service = info.pop("_decode_s") + elapsed / len(valid)
                    responses[idx] = {
                        "text": text,
                        "model_version": self.model_version,
                        "model_name": self.model_name,
                        **info,
                        "service_ms": round(service * 1000.0, 3),
                        "inference_ms": round(elapsed * 1000.0, 3),
                        "rtf": round(service / info["duration_s"], 5) if info["duration_s"] > 0 else None,
                        "batch_size": len(valid),
                    }
        out = []
        for idx, (resp, status) in enumerate(zip(responses, statuses)):
            if status != 200:
                resp = {**resp, "model_version": self.model_version}
            _set_status(context, idx, status)
            out.append(json.dumps(resp, separators=(",", ":")))
        return out


def _set_status(context: Any, idx: int, status: int) -> None:
    try:
        context.set_response_content_type(idx, "application/json")
        if status != 200:
            context.set_response_status(code=status, phrase=_PHRASES.get(status, "Error"), idx=idx)
    except Exception:  # noqa: BLE001 - a bare context without request processors (tests)
        pass


_PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error"}

_service = ASRService()


def handle(data: list[Any] | None, context: Any) -> list[str] | None:
    """TorchServe's entry point (a module function, so this file may define helper classes)."""
    return _service.handle(data, context)
