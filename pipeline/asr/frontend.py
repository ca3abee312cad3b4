"""The log-mel front end: one definition shared by feature extraction, training and export.

``LogMel`` is a TorchScript-able module so the exported model computes exactly the
features the cached shards hold. Before the mel transform, ``level: rms`` removes each
utterance's DC offset and scales it to unit RMS (so the recording level does not matter)
and ``dither_db`` adds a fixed, deterministic noise (:data:`DITHER_SAMPLES` seeded samples,
repeated) that many dB below it (so digital silence gives ordinary, finite features).
After the log, ``normalize: utterance`` subtracts the utterance's mean log-mel, ``sliding``
a sliding-window mean (torchaudio ``sliding_window_cmn``), ``global`` nothing (the model
applies the pool's per-bin statistics in every case). Lengths make all of it per
utterance, so a padded batch gives each utterance its own features. The transform is
torchaudio ``MelSpectrogram`` with ``win_length``/
``hop_length`` = ``win_ms``/``hop_ms`` at ``config.audio.sample_rate`` (25 ms / 10 ms at
8 kHz -> 200 / 80 samples), ``n_fft`` the next power of two >= ``win_length``, periodic
Hann window, ``center=True`` with reflect padding, power 2, HTK mel scale from 0 Hz to
Nyquist, no filter normalization; then ``ln(mel + 1e-6)``. An utterance of ``n`` samples
has ``1 + n // hop_length`` frames. A fixed log floor rather than
``AmplitudeToDB(top_db=…)``: ``top_db`` clamps relative to the loudest value of whatever
tensor it is given, so an utterance's features would depend on how it was batched; the
floor is per element.

:class:`FrontEnd` is one front end's identity (its settings plus the shards' storage
format; its hash names the feature cache). :class:`LogMelComputer` computes the same
features for many utterances at once, exactly: each utterance is reflect-padded on its
own, the padded signals are laid end to end on hop-aligned offsets, and one
``torch.stft(center=False)`` covers them all; frames straddling two utterances are
dropped. Every kept frame sees exactly the samples ``MelSpectrogram`` gives it, so the
features equal the per-utterance transform up to float rounding (the tests compare
them), without its per-call overhead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
import torchaudio

from pipeline.config import FeatureConfig
from pipeline.data.features import STORAGE_FORMAT

LOG_FLOOR = 1e-6
DITHER_SAMPLES = 1 << 15
DITHER_SEED = 20261201


def dither_noise() -> torch.Tensor:
    """The fixed dither: standard normal samples from a seeded generator (repeated as needed)."""
    return torch.randn(DITHER_SAMPLES, generator=torch.Generator().manual_seed(DITHER_SEED))


def frontend_settings(features: FeatureConfig, sample_rate: int) -> dict[str, Any]:
    """The settings that determine the features (and so the cache key)."""
    win = int(round(features.win_ms * sample_rate / 1000))
    hop = int(round(features.hop_ms * sample_rate / 1000))
    n_fft = 1
    while n_fft < win:
        n_fft *= 2
    return {
        "sample_rate": int(sample_rate),
        "n_mels": int(features.n_mels),
        "win_length": win,
        "hop_length": hop,
        "n_fft": n_fft,
        "log_floor": LOG_FLOOR,
        "level": features.level,
        "dither_db": features.dither_db,
        "normalize": features.normalize,
        "cmn_window": int(features.cmn_window),
        "kind": "torchaudio.MelSpectrogram+log",
    }


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class LogMel(torch.nn.Module):
    """waveform [B, S] (or [S]) + optional lengths [B] -> log-mel [B, frames, n_mels]."""

    def __init__(self, settings: dict[str, Any]):
        super().__init__()
        self.hop_length = int(settings["hop_length"])
        self.log_floor = float(settings.get("log_floor", LOG_FLOOR))
        self.level_rms = settings.get("level", "none") == "rms"
        dither_db = settings.get("dither_db")
        self.dither = 0.0 if dither_db is None else float(10.0 ** (float(dither_db) / 20.0))
        self.normalize = str(settings.get("normalize", "global"))
        self.cmn_window = int(settings.get("cmn_window", 300))
        self.register_buffer("noise", dither_noise())
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=int(settings["sample_rate"]),
            n_fft=int(settings["n_fft"]),
            win_length=int(settings["win_length"]),
            hop_length=self.hop_length,
            n_mels=int(settings["n_mels"]),
            center=True,
        )

    def condition(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Level and dither, per utterance, on [B, S]; samples past an utterance's length stay 0."""
        n = wave.size(-1)
        valid = (torch.arange(n, device=wave.device).unsqueeze(0) < lengths.unsqueeze(1)).to(wave.dtype)
        if self.level_rms:
            count = lengths.clamp(min=1).to(wave.dtype).unsqueeze(1)
            wave = (wave - (wave * valid).sum(-1, keepdim=True) / count) * valid
            rms = (wave.square().sum(-1, keepdim=True) / count).sqrt().clamp_min(1e-8)
            wave = wave / rms
        if self.dither > 0:
            noise = self.noise.repeat(n // self.noise.numel() + 1)[:n].to(wave.dtype)
            wave = wave + self.dither * noise.unsqueeze(0) * valid
        return wave

    def normalized(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Per-utterance mean normalization of log-mels [B, T, M] over each one's ``frames``."""
        if self.normalize == "utterance":
            valid = (torch.arange(x.size(1), device=x.device).unsqueeze(0) < frames.unsqueeze(1)).to(x.dtype)
            mean = (x * valid.unsqueeze(-1)).sum(1, keepdim=True) / frames.clamp(min=1).to(x.dtype).view(-1, 1, 1)
            x = (x - mean) * valid.unsqueeze(-1)
        elif self.normalize == "sliding":
            out = torch.zeros_like(x)
            for b in range(x.size(0)):
                f = int(frames[b])
                out[b, :f] = torchaudio.functional.sliding_window_cmn(
                    x[b, :f], cmn_window=self.cmn_window, min_cmn_window=min(100, self.cmn_window), center=True)
            x = out
        return x

    def forward(self, wave: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        single = wave.dim() == 1
        if single:
            wave = wave.unsqueeze(0)
        if lengths is None:
            lengths = torch.full((wave.size(0),), wave.size(-1), dtype=torch.long, device=wave.device)
        x = torch.log(self.mel(self.condition(wave, lengths)) + self.log_floor).transpose(-1, -2)
        x = self.normalized(x, self.num_frames(lengths).clamp(max=x.size(1)))
        return x.squeeze(0) if single else x

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        return torch.div(num_samples, self.hop_length, rounding_mode="floor") + 1


def build_frontend(features: FeatureConfig, sample_rate: int) -> LogMel:
    return LogMel(frontend_settings(features, sample_rate))


class FrontEnd:
    """One log-mel front end: :func:`frontend_settings`'s settings plus the storage format.

    ``settings`` is exactly what :func:`frontend_settings` gives (so :class:`LogMel` and the
    exported model rebuild the same transform from a run's ``index.json``); :attr:`hash`
    also covers the storage format of the shards (:data:`pipeline.data.features.STORAGE_FORMAT`).
    """

    def __init__(self, settings: dict[str, Any]):
        self.settings = dict(settings)
        self.sample_rate = int(settings["sample_rate"])
        self.n_mels = int(settings["n_mels"])
        self.win_length = int(settings["win_length"])
        self.hop_length = int(settings["hop_length"])
        self.n_fft = int(settings["n_fft"])
        if self.hop_length < 1 or self.win_length < 2:
            raise ValueError(
                f"front end too fine for {self.sample_rate} Hz: window {self.win_length} and hop "
                f"{self.hop_length} samples; raise win_ms/hop_ms"
            )
        if self.n_mels > self.n_fft // 2 + 1:
            raise ValueError(
                f"n_mels={self.n_mels} exceeds the {self.n_fft // 2 + 1} FFT bins of a {self.win_length}-sample "
                f"window at {self.sample_rate} Hz; lower n_mels or raise win_ms"
            )

    @classmethod
    def from_config(cls, config: FeatureConfig, sample_rate: int) -> FrontEnd:
        return cls(frontend_settings(config, sample_rate))

    @property
    def storage(self) -> dict[str, Any]:
        return dict(STORAGE_FORMAT)

    @property
    def hash(self) -> str:
        return settings_hash({**self.settings, "storage": self.storage})

    def count_frames(self, n_samples: int) -> int:
        return 1 + n_samples // self.hop_length

    def build_module(self) -> LogMel:
        """The reference per-utterance transform (waveform -> log-mel [frames, n_mels])."""
        return LogMel(self.settings)


class LogMelComputer:
    """Batched, exact log-mel features for many utterances (see the module docstring).

    Window, filterbank, FFT size, hop and log floor are read off :class:`LogMel` itself, so
    the two cannot drift apart silently; settings the batching does not reproduce fail
    here rather than give different features.
    """

    def __init__(self, frontend: FrontEnd):
        self.frontend = frontend
        reference = frontend.build_module()
        spec, mel = reference.mel.spectrogram, reference.mel.mel_scale
        if not (spec.center and spec.pad_mode == "reflect" and spec.power == 2.0 and not spec.normalized
                and spec.pad == 0 and spec.onesided):
            raise NotImplementedError(
                "batched log-mel extraction assumes center=True, reflect padding, power 2, no normalization; "
                "pipeline.asr.frontend.LogMel changed: update LogMelComputer to match"
            )
        self.n_fft, self.win_length, self.hop_length = spec.n_fft, spec.win_length, spec.hop_length
        self.window = spec.window.detach().clone()
        self.fbank = mel.fb.detach().clone()  # [n_fft // 2 + 1, n_mels]
        self.log_floor = float(reference.log_floor)
        self.reference = reference  # level, dither and mean normalization: the module's own code, per utterance

    def compute(self, waves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Log-mels of ``waves`` (float32 mono at the front end's rate), stored dtype.

        Returns ``(features [sum(frames), n_mels], frames per utterance)``: the
        utterances' frames end to end, in order.
        """
        half, hop = self.n_fft // 2, self.hop_length
        waves = [self._condition(w) for w in waves]
        starts: list[int] = []
        frames: list[int] = []
        pos = 0
        for w in waves:
            if w.ndim != 1 or w.shape[0] <= half:
                raise ValueError(f"need mono audio longer than {half} samples, got shape {tuple(w.shape)}")
            starts.append(pos)
            frames.append(1 + w.shape[0] // hop)
            padded = w.shape[0] + 2 * half
            pos += -(-padded // hop) * hop  # next utterance starts on a hop boundary
        buf = np.zeros(max(pos, self.n_fft), dtype=np.float32)
        for start, w in zip(starts, waves, strict=True):  # reflect-pad like torch.stft(center=True)
            n = w.shape[0]
            buf[start:start + half] = w[half:0:-1]
            buf[start + half:start + half + n] = w
            buf[start + half + n:start + 2 * half + n] = w[n - 2:n - 2 - half:-1] if n - 2 - half >= 0 else w[n - 2::-1]
        spec = torch.stft(
            torch.from_numpy(buf), self.n_fft, hop, self.win_length, self.window, center=False, return_complex=True
        )
        power = spec.real.square() + spec.imag.square()  # |X|^2 without the sqrt of abs()
        mel = torch.matmul(power.transpose(0, 1), self.fbank)  # [all frames, n_mels]
        kept = [np.arange(s // hop, s // hop + f) for s, f in zip(starts, frames, strict=True)]
        rows = torch.from_numpy(np.concatenate(kept))
        logmel = torch.log(mel.index_select(0, rows).add_(self.log_floor))
        if self.reference.normalize != "global":
            parts = torch.split(logmel, frames)
            logmel = torch.cat([self.reference.normalized(x.unsqueeze(0), torch.tensor([f]))[0]
                                for x, f in zip(parts, frames, strict=True)])
        return logmel.to(torch.float16).numpy(), np.asarray(frames, dtype=np.int64)

    def _condition(self, wave: np.ndarray) -> np.ndarray:
        if not (self.reference.level_rms or self.reference.dither > 0) or wave.ndim != 1:
            return wave
        x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).unsqueeze(0)
        return self.reference.condition(x, torch.tensor([x.size(1)]))[0].numpy()


def compute_log_mel(wave: np.ndarray, frontend: FrontEnd) -> np.ndarray:
    """Log-mel features of one utterance, float16 [frames, n_mels]."""
    feats, _ = LogMelComputer(frontend).compute([np.asarray(wave, dtype=np.float32)])
    return feats
