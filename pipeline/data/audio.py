"""Audio decoding, conversion and encoding.

Decoding goes through ``soundfile`` (libsndfile: WAV, FLAC, OGG, ... at any sample rate
and channel count); torchaudio >= 2.9 no longer decodes files, so it is used only for
resampling (:func:`resample`, the one resampler of the pipeline). Everything that enters the pool is converted once to mono at the front-end
sample rate and stored as **16-bit PCM WAV**: the source recordings are 16-bit, so
nothing is lost, files are half the size of float WAV, and out-of-range samples are
clipped explicitly here rather than silently by a writer.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT

__all__ = ["AudioDecodeError", "decode_audio", "encode_wav", "resample", "rms_dbfs", "to_mono_resampled"]


class AudioDecodeError(ValueError):
    """The bytes are not audio that libsndfile can decode; the message says why."""


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode audio bytes to ``(float32 array [channels, samples], sample_rate)``.

    Integer formats are scaled to [-1, 1); float formats are returned as stored (they may
    hold values outside [-1, 1] or non-finite samples — check them).
    """
    if not data:
        raise AudioDecodeError("empty file (0 bytes)")
    try:
        samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioDecodeError(f"cannot decode audio ({len(data)} bytes): {exc}") from None
    if sample_rate <= 0:
        raise AudioDecodeError(f"invalid sample rate {sample_rate}")
    if samples.shape[1] == 0:
        raise AudioDecodeError("audio has no channels")
    return np.ascontiguousarray(samples.T, dtype=np.float32), int(sample_rate)


def resample(
    wave: np.ndarray | torch.Tensor, orig_sr: int, new_sr: int, *, cache_kernel: bool = False
) -> np.ndarray | torch.Tensor:
    """``wave`` ([..., samples]) converted from ``orig_sr`` to ``new_sr`` Hz with torchaudio's
    windowed-sinc resampler, as float32 of the kind given (numpy array or tensor).

    Returned as it is (as contiguous float32) when the rates are equal or there are no samples. By
    default the filter kernel is built for each call in the samples' precision
    (``torchaudio.functional.resample``). ``cache_kernel`` reuses one
    ``torchaudio.transforms.Resample`` per rate pair instead (its kernel is computed once in
    float64 and kept as float32): faster for many short clips, and slightly different in
    the last bits, so a caller keeps to one of the two.
    """
    is_numpy = not isinstance(wave, torch.Tensor)
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)) if is_numpy else wave.to(torch.float32)
    if orig_sr != new_sr and x.numel() > 0:
        if cache_kernel:
            with torch.no_grad():
                x = _cached_resampler(orig_sr, new_sr)(x)
        else:
            x = AF.resample(x, orig_freq=orig_sr, new_freq=new_sr)
    return np.ascontiguousarray(x.numpy()) if is_numpy else x.contiguous()


@functools.lru_cache(maxsize=8)
def _cached_resampler(orig_sr: int, new_sr: int) -> AT.Resample:
    """A torchaudio resampler whose filter kernel is computed once per rate pair."""
    return AT.Resample(orig_sr, new_sr)


def to_mono_resampled(wave: np.ndarray | torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """Downmix ``[channels, samples]`` (or ``[samples]``) by channel mean and resample to ``target_sr``."""
    x = torch.as_tensor(wave, dtype=torch.float32)
    if x.dim() == 2:
        x = x.mean(dim=0)
    elif x.dim() != 1:
        raise ValueError(f"expected [channels, samples] or [samples], got shape {tuple(x.shape)}")
    return resample(x, sr, target_sr)


def rms_dbfs(x: np.ndarray | torch.Tensor) -> float:
    """RMS level in dB relative to full scale (1.0); ``-inf`` for empty or all-zero input."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(arr, dtype=np.float64))))
    return 20.0 * math.log10(rms) if rms > 0.0 else -math.inf


def encode_wav(x: np.ndarray | torch.Tensor, sr: int) -> bytes:
    """Encode mono samples in [-1, 1] as 16-bit PCM WAV bytes (clipped; deterministic output)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"encode_wav takes mono samples [samples], got shape {arr.shape}")
    arr = np.clip(arr.astype(np.float32, copy=False), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, arr, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()
