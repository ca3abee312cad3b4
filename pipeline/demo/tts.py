"""Speech synthesis with eSpeak NG, called through ctypes.

The ``espeakng-loader`` package bundles the eSpeak NG shared library and its data folder,
so no system package is needed. The engine runs in synchronous mode: ``espeak_Synth``
returns once the whole text is spoken, and a callback collects the 16-bit samples
(22,050 Hz for the bundled voices).

eSpeak NG is one global C library per process (one current voice, one set of
parameters, one callback), so every synthesis holds a module lock; threads share the
engine through it. Across processes prefer :func:`synthesize_isolated` (a forked child
would inherit the parent's engine state).

Voices are eSpeak names with an optional variant, e.g. ``en+f3``, ``en-us+m3``,
``en-gb-x-rp+m7``; ``rate`` is in words per minute (80..450, default 175), ``pitch`` and
``pitch_range`` are 0..100 (default 50), ``word_gap`` is an extra pause between words in
10 ms units (default 0) and ``volume`` the amplitude, 0..200 (default 100).

Repeatability: eSpeak NG's waveform generator keeps state from one call to the next
(pitch-flutter phase, automatic gain, echo buffer; none of it can be reset through the
API), so the same arguments give slightly different samples depending on what was spoken
before in the process. A sequence of calls in a *fresh* process is exactly repeatable:
:func:`synthesize_isolated` runs a batch in a new ``python -m pipeline.demo.tts`` process
when the output must be byte-identical, as the demo corpus does.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["SpeechRequest", "TtsError", "synthesize", "synthesize_batch", "synthesize_isolated"]

# espeak_AUDIO_OUTPUT, options and flags from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
# espeak_PARAMETER
_RATE = 1
_VOLUME = 2
_PITCH = 3
_RANGE = 4
_WORDGAP = 7

_PROJECT_ROOT = Path(__file__).resolve().parents[2]

MIN_RATE, MAX_RATE = 80, 450
MIN_PITCH, MAX_PITCH = 0, 100
MAX_VOLUME = 200

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class TtsError(RuntimeError):
    """eSpeak NG could not be loaded, or could not speak the requested text or voice."""


@dataclass(frozen=True)
class SpeechRequest:
    """One text to speak, with its voice settings (picklable, for :func:`synthesize_batch`)."""

    text: str
    voice: str = "en"
    rate: int = 175
    pitch: int = 50
    seed: int = 0
    pitch_range: int = 50
    word_gap: int = 0
    volume: int = 100


@dataclass
class _Engine:
    lib: ctypes.CDLL
    sample_rate: int
    callback: object  # keeps the ctypes callback alive as long as the engine
    chunks: list[np.ndarray]
    variants: frozenset[str]  # the bundled voice variants (voices/!v); eSpeak ignores an unknown one silently


_lock = threading.Lock()
_engine: _Engine | None = None


def _load_engine() -> _Engine:
    try:
        import espeakng_loader
    except ImportError as exc:
        raise TtsError(
            "eSpeak NG is not available: the 'espeakng-loader' package is not installed "
            "(pip install espeakng-loader==0.2.4, or pip install -e '.[test]' in the project)"
        ) from exc
    lib_path = espeakng_loader.get_library_path()
    try:
        data_path = espeakng_loader.get_data_path()
    except RuntimeError as exc:
        raise TtsError(f"eSpeak NG data folder missing: {exc}; reinstall espeakng-loader") from exc
    try:
        lib = ctypes.CDLL(lib_path)
    except OSError as exc:
        raise TtsError(f"cannot load the eSpeak NG library from {lib_path}: {exc}; reinstall espeakng-loader") from exc

    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None

    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
    if sample_rate <= 0:
        raise TtsError(f"eSpeak NG failed to initialize (library {lib_path}, data {data_path})")

    chunks: list[np.ndarray] = []

    def collect(wav, numsamples, _events) -> int:  # noqa: ANN001 - ctypes callback
        if wav and numsamples > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0  # 0 = continue synthesis

    callback = _SynthCallback(collect)
    lib.espeak_SetSynthCallback(callback)
    variant_dir = Path(data_path) / "voices" / "!v"
    variants = frozenset(p.name for p in variant_dir.iterdir()) if variant_dir.is_dir() else frozenset()
    return _Engine(lib=lib, sample_rate=sample_rate, callback=callback, chunks=chunks, variants=variants)


def _get_engine() -> _Engine:
    global _engine
    if _engine is None:
        _engine = _load_engine()
    return _engine


def synthesize(
    text: str, voice: str = "en", rate: int = 175, pitch: int = 50, seed: int = 0, *,
    pitch_range: int = 50, word_gap: int = 0, volume: int = 100,
) -> tuple[np.ndarray, int]:
    """Speak ``text`` with an eSpeak NG ``voice``; return mono float32 samples in [-1, 1) and their rate.

    eSpeak NG adds pseudo-random jitter to its waveform; ``seed`` resets that generator so
    the same arguments always give the same samples.

    Raises :class:`TtsError` if the library cannot be loaded, the voice is unknown, or the
    text produced no audio.
    """
    if not text.strip():
        raise TtsError("nothing to synthesize: text is empty")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise TtsError(f"rate {rate} outside {MIN_RATE}..{MAX_RATE} words per minute")
    if not MIN_PITCH <= pitch <= MAX_PITCH:
        raise TtsError(f"pitch {pitch} outside {MIN_PITCH}..{MAX_PITCH}")
    if not MIN_PITCH <= pitch_range <= MAX_PITCH:
        raise TtsError(f"pitch_range {pitch_range} outside {MIN_PITCH}..{MAX_PITCH}")
    if word_gap < 0 or not 0 <= volume <= MAX_VOLUME:
        raise TtsError(f"word_gap {word_gap} must be >= 0 and volume {volume} within 0..{MAX_VOLUME}")
    with _lock:
        engine = _get_engine()
        lib = engine.lib
        variant = voice.partition("+")[2]
        if variant and variant not in engine.variants:
            raise TtsError(f"unknown eSpeak NG voice variant {variant!r} in {voice!r} (e.g. m1..m8, f1..f5, klatt)")
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise TtsError(f"unknown eSpeak NG voice {voice!r} (use e.g. 'en+f3', 'en-us+m3')")
        # Set every parameter on every call: eSpeak keeps them globally between calls.
        settings = ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_WORDGAP, word_gap), (_VOLUME, volume))
        for param, value in settings:
            if lib.espeak_SetParameter(param, int(value), 0) != _EE_OK:
                raise TtsError(f"eSpeak NG rejected parameter {param}={value}")
        lib.espeak_ng_SetRandSeed(seed)
        engine.chunks.clear()
        data = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(data, len(data))
        status = lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        if status != _EE_OK:
            raise TtsError(f"eSpeak NG failed to synthesize {text!r} with voice {voice!r} (error {status})")
        samples = np.concatenate(engine.chunks) if engine.chunks else np.zeros(0, dtype=np.int16)
        engine.chunks.clear()
        sample_rate = engine.sample_rate
    if samples.size == 0:
        raise TtsError(f"eSpeak NG produced no audio for {text!r} with voice {voice!r}")
    return samples.astype(np.float32) / 32768.0, sample_rate


def synthesize_batch(requests: Sequence[SpeechRequest]) -> tuple[list[np.ndarray], int]:
    """Speak every request in order in this process; return the sample arrays and their rate."""
    out: list[np.ndarray] = []
    sample_rate = 0
    for r in requests:
        samples, sample_rate = synthesize(
            r.text, r.voice, r.rate, r.pitch, r.seed, pitch_range=r.pitch_range, word_gap=r.word_gap, volume=r.volume
        )
        out.append(samples)
    return out, sample_rate


def synthesize_isolated(requests: Sequence[SpeechRequest]) -> tuple[list[np.ndarray], int]:
    """Like :func:`synthesize_batch`, but in a new Python process (``python -m pipeline.demo.tts``).

    The output depends only on ``requests``: eSpeak NG starts from its initial state.
    Safe to call from several threads at once (each call is its own process).
    """
    if not requests:
        return [], 0
    if not sys.executable:
        raise TtsError("cannot start the eSpeak NG worker: sys.executable is unknown")
    payload = json.dumps([asdict(r) for r in requests]).encode("utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.demo.tts"], input=payload, capture_output=True, env=env, check=False
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        raise TtsError(f"eSpeak NG worker failed (exit {proc.returncode}): " + " | ".join(tail))
    with np.load(io.BytesIO(proc.stdout)) as data:
        pcm, lengths, sample_rate = data["pcm"], data["lengths"], int(data["sample_rate"])
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [pcm[a:b].astype(np.float32) / 32768.0 for a, b in zip(bounds[:-1], bounds[1:])], sample_rate


def _serve_stdin() -> None:
    """Worker entry point: JSON list of requests on stdin, an ``.npz`` of int16 samples on stdout."""
    requests = [SpeechRequest(**r) for r in json.loads(sys.stdin.buffer.read())]
    waves, sample_rate = synthesize_batch(requests)
    pcm = [np.round(w * 32768.0).astype(np.int16) for w in waves]
    buf = io.BytesIO()
    np.savez(buf, pcm=np.concatenate(pcm), lengths=np.array([len(p) for p in pcm]), sample_rate=sample_rate)
    sys.stdout.buffer.write(buf.getvalue())
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    _serve_stdin()
