"""Training-time augmentation (``augment:``); evaluation and serving never augment.

Waveform augmentations make ``augment.copies`` copies of every pool utterance at feature
extraction, each with its own seeded :class:`Draw` (a speed factor from ``speed``, a gain
in ``gain_db``, and with probability ``noise_prob`` generated white/pink/brown noise at an
SNR in ``noise_snr_db``), applied with torchaudio's ``Speed``, ``add_noise`` and ``Vol``.
A copy is content-addressed in the front end's feature cache by (audio sha256,
:func:`augment_hash`, copy number), so it is computed once and reused by later runs;
:func:`copy_key` names it. Every epoch the training loop picks, per utterance, the clean
features or one copy (:class:`pipeline.data.dataset.IndexedFeatures`).

Feature-domain augmentation runs on the fly in the model, in training mode only:
:class:`MelWarp` (vocal-tract-length perturbation of the mel axis) and SpecAugment.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio
from torch import nn

from pipeline.config import AugmentConfig

NOISE_KINDS = ("white", "pink", "brown")
# augmentation settings a search trial may tune: they run on the fly, so no feature re-extraction
ONLINE_PARAMS = ("vtlp",)


@dataclass(frozen=True)
class Draw:
    """What one augmented copy of one utterance gets."""

    speed: float
    gain_db: float
    snr_db: float | None
    noise: str | None
    noise_seed: int


def augment_hash(cfg: AugmentConfig) -> str:
    """Names the waveform-augmentation settings (what the cached copies depend on)."""
    settings = {"speed": cfg.speed, "gain_db": cfg.gain_db, "noise_snr_db": cfg.noise_snr_db,
                "noise_prob": cfg.noise_prob, "seed": cfg.seed, "version": 1}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def copy_key(sha256: str, cfg: AugmentConfig, copy: int) -> str:
    """The cache key of augmented copy ``copy`` (1-based) of the audio with this sha256."""
    return f"{sha256}+{augment_hash(cfg)}.{copy}"


def draw(cfg: AugmentConfig, sha256: str, copy: int) -> Draw:
    """The seeded draw of copy ``copy`` of this audio: the same for the same settings, always."""
    rng = np.random.default_rng([cfg.seed, int(sha256[:15], 16), copy])
    speed = float(cfg.speed[int(rng.integers(len(cfg.speed)))])
    gain = float(rng.uniform(*cfg.gain_db)) if cfg.gain_db is not None else 0.0
    noisy = cfg.noise_snr_db is not None and rng.random() < cfg.noise_prob
    snr = float(rng.uniform(*cfg.noise_snr_db)) if noisy else None
    kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))] if noisy else None
    return Draw(speed=speed, gain_db=round(gain, 3), snr_db=None if snr is None else round(snr, 3), noise=kind,
                noise_seed=int(rng.integers(2**31)))


def generate_noise(kind: str, n: int, seed: int) -> np.ndarray:
    """Unit-RMS white, pink (1/f) or brown (1/f²) noise of ``n`` samples, by spectral shaping."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(n)
    if kind != "white":
        spectrum = np.fft.rfft(white)
        f = np.arange(spectrum.size, dtype=np.float64)
        f[0] = 1.0
        spectrum /= f ** (0.5 if kind == "pink" else 1.0)
        white = np.fft.irfft(spectrum, n)
    white -= white.mean()
    return (white / max(float(np.sqrt(np.mean(white**2))), 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _speed(sample_rate: int, factor: float) -> torchaudio.transforms.Speed:
    return torchaudio.transforms.Speed(sample_rate, factor)


def change_speed(wave: torch.Tensor, sample_rate: int, factor: float) -> torch.Tensor:
    """[C, S] played ``factor`` times as fast (pitch and tempo, as Kaldi/ESPnet speed perturbation)."""
    if factor == 1.0:
        return wave
    out, _ = _speed(sample_rate, factor)(wave, torch.tensor([wave.size(-1)]))
    return out


def add_noise(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """``wave`` [C, S] plus ``noise`` scaled to ``snr_db`` (torchaudio ``add_noise``)."""
    return torchaudio.functional.add_noise(wave, noise[..., : wave.size(-1)], torch.tensor([snr_db]))


def augment_wave(wave: np.ndarray, sample_rate: int, d: Draw) -> np.ndarray:
    """One augmented copy: speed, then noise, then gain (a recording level; ``Vol`` clips at ±1)."""
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).unsqueeze(0)
    x = change_speed(x, sample_rate, d.speed)
    if d.snr_db is not None and d.noise is not None:
        x = add_noise(x, torch.from_numpy(generate_noise(d.noise, x.size(-1), d.noise_seed)).unsqueeze(0), d.snr_db)
    if d.gain_db:
        x = torchaudio.transforms.Vol(d.gain_db, gain_type="db")(x)
    return x[0].numpy()


def warp_mel(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Log-mels [B, T, M] with each utterance's mel axis warped by its factor ``alpha`` [B].

    Piecewise linear, as VTLP (Jaitly & Hinton 2013) on the mel index: bin ``m`` reads bin
    ``m / alpha`` below a boundary at 80 % of the axis, and the rest is stretched to end on
    the last bin; values between bins are interpolated. ``alpha = 1`` is the identity.
    """
    m = x.size(-1)
    top = float(m - 1)
    idx = torch.arange(m, dtype=x.dtype, device=x.device).unsqueeze(0)  # [1, M]
    a = alpha.to(x.dtype).unsqueeze(1)  # [B, 1]
    bound = 0.8 * top * torch.clamp(a, max=1.0)
    low = idx / a
    high = bound / a + (idx - bound) * (top - bound / a) / (top - bound)
    src = torch.where(idx <= bound, low, high).clamp(0.0, top)  # [B, M]
    left = src.floor().long()
    right = (left + 1).clamp(max=m - 1)
    w = (src - left.to(x.dtype)).unsqueeze(1)  # [B, 1, M]
    t = x.size(1)
    gather_l = torch.gather(x, 2, left.unsqueeze(1).expand(-1, t, -1))
    gather_r = torch.gather(x, 2, right.unsqueeze(1).expand(-1, t, -1))
    return gather_l * (1.0 - w) + gather_r * w


class MelWarp(nn.Module):
    """Vocal-tract-length perturbation in training mode: a factor in [1 - v, 1 + v] per utterance."""

    def __init__(self, max_warp: float = 0.0):
        super().__init__()
        self.max_warp = float(max_warp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.max_warp <= 0.0:
            return x
        alpha = 1.0 + (torch.rand(x.size(0), device=x.device) * 2.0 - 1.0) * self.max_warp
        return warp_mel(x, alpha)
