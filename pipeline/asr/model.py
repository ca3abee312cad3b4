"""The character-level CTC model: conv subsampling, a chosen encoder, a linear head.

Encoders (``model.encoder``): ``conformer`` (torchaudio.models.Conformer), ``lstm``
(bidirectional LSTM) and ``transformer`` (torch.nn.TransformerEncoder). SpecAugment
(torchaudio's time and frequency masks) and the mel-axis warp (:class:`pipeline.asr.augment.MelWarp`,
``augment.vtlp``) are applied in training mode only. Features are
normalized with the pool's per-mel mean/std kept as buffers, so the exported model
carries them. Every module here is TorchScript-able.
"""

from __future__ import annotations

import math

import torch
import torchaudio
from torch import nn

from pipeline.asr.augment import MelWarp
from pipeline.config import ModelConfig


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Frames after two stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(2):
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return lengths


class ConvSubsample(nn.Module):
    """[B, T, F] -> [B, ~T/4, d_model] with two stride-2 Conv2d layers."""

    def __init__(self, n_mels: int, channels: int, d_model: int, dropout: float):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        freq = n_mels
        for _ in range(2):
            freq = (freq - 1) // 2 + 1
        self.proj = nn.Linear(channels * freq, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))  # [B, C, T', F']
        b, c, t, f = x.shape
        x = x.permute(0, 2, 1, 3).reshape(b, t, c * f)
        return self.dropout(self.proj(x))


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 4000):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.size(1)].unsqueeze(0)


def _padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


class LSTMEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.lstm = nn.LSTM(
            cfg.d_model,
            cfg.d_model // 2,
            num_layers=cfg.num_layers,
            bidirectional=True,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conformer = torchaudio.models.Conformer(
            input_dim=cfg.d_model,
            num_heads=cfg.attention_heads,
            ffn_dim=cfg.d_model * cfg.ffn_mult,
            num_layers=cfg.num_layers,
            depthwise_conv_kernel_size=cfg.conv_kernel,
            dropout=cfg.dropout,
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.conformer(x, lengths)
        return out


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pos = PositionalEncoding(cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.attention_heads,
            dim_feedforward=cfg.d_model * cfg.ffn_mult,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = _padding_mask(lengths, x.size(1))
        return self.encoder(self.pos(x), src_key_padding_mask=mask)


class ASRModel(nn.Module):
    """log-mel [B, T, n_mels] + lengths -> CTC log-probs [B, T', V] + output lengths."""

    def __init__(self, cfg: ModelConfig, n_mels: int, vocab_size: int, vtlp: float = 0.0):
        super().__init__()
        self.n_mels = n_mels
        self.melwarp = MelWarp(vtlp)
        self.register_buffer("feat_mean", torch.zeros(n_mels))
        self.register_buffer("feat_std", torch.ones(n_mels))
        self.specaugment = torchaudio.transforms.SpecAugment(
            n_time_masks=cfg.time_masks,
            time_mask_param=cfg.time_mask_width,
            n_freq_masks=cfg.freq_masks,
            freq_mask_param=cfg.freq_mask_width,
            iid_masks=True,
            zero_masking=True,
        )
        self.use_specaugment = (cfg.time_masks * cfg.time_mask_width + cfg.freq_masks * cfg.freq_mask_width) > 0
        self.subsample = ConvSubsample(n_mels, cfg.subsample_channels, cfg.d_model, cfg.dropout)
        if cfg.encoder == "conformer":
            self.encoder: nn.Module = ConformerEncoder(cfg)
        elif cfg.encoder == "transformer":
            self.encoder = TransformerEncoder(cfg)
        else:
            self.encoder = LSTMEncoder(cfg)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def set_normalization(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.feat_mean.copy_(mean.to(self.feat_mean))
        self.feat_std.copy_(var.to(self.feat_std).clamp_min(1e-8).sqrt())

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (feats - self.feat_mean) / self.feat_std
        mask = _padding_mask(lengths, x.size(1)).unsqueeze(-1)
        x = x.masked_fill(mask, 0.0)
        if self.training:
            x = self.melwarp(x).masked_fill(mask, 0.0)
        if self.training and self.use_specaugment:
            x = self.specaugment(x.transpose(1, 2)).transpose(1, 2)
        x = self.subsample(x)
        out_lengths = subsampled_lengths(lengths).clamp(min=1, max=x.size(1))
        x = self.encoder(x, out_lengths)
        return self.head(x).log_softmax(dim=-1), out_lengths
