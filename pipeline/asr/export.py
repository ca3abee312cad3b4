"""Export: the trained model + its front end + vocabulary as one TorchScript file.

``model.pt`` is ``torch.jit.script`` of :class:`ServingModel` (waveform in, CTC
log-probs out) with ``meta.json`` embedded as an extra file (tokens, sample rate,
front-end settings, hyperparameters, lineage). :func:`load_exported` needs only torch:
evaluation, the register stage and TorchServe all load this same artifact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.asr.frontend import LogMel
from pipeline.asr.model import ASRModel
from pipeline.asr.vocab import greedy_decode

META = "meta.json"
FORMAT = "asr-retune/torchscript-ctc/1"


class ServingModel(torch.nn.Module):
    """waveform [B, S] at the model's rate + lengths -> (log-probs [B, T', V], output lengths)."""

    def __init__(self, frontend: LogMel, model: ASRModel):
        super().__init__()
        self.frontend = frontend
        self.model = model

    def forward(self, wave: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.frontend(wave, wave_lengths)
        lengths = self.frontend.num_frames(wave_lengths).clamp(max=feats.size(1))
        return self.model(feats, lengths)


def export_model(model: ASRModel, frontend_settings: dict[str, Any], path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Script and save; the file appears only when complete."""
    from pipeline.asr.vocab import TOKENS

    serving = ServingModel(LogMel(frontend_settings), model).eval().cpu()
    scripted = torch.jit.script(serving)
    full_meta = {
        "format": FORMAT,
        "tokens": list(TOKENS),
        "blank": 0,
        "sample_rate": int(frontend_settings["sample_rate"]),
        "frontend": frontend_settings,
        **meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    scripted.save(str(tmp), _extra_files={META: json.dumps(full_meta, sort_keys=True)})
    os.replace(tmp, path)
    return path


@dataclass
class ExportedModel:
    """A loaded export: call :meth:`transcribe` on mono float waveforms at ``sample_rate``."""

    module: torch.jit.ScriptModule
    meta: dict[str, Any]

    @property
    def sample_rate(self) -> int:
        return int(self.meta["sample_rate"])

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return greedy_decode(log_probs, lengths, self.meta["tokens"], int(self.meta.get("blank", 0)))

    @torch.inference_mode()
    def transcribe(self, waves: list[np.ndarray | torch.Tensor]) -> list[str]:
        return self.transcribe_checked(waves)[0]

    @torch.inference_mode()
    def transcribe_checked(self, waves: list[np.ndarray | torch.Tensor]) -> tuple[list[str], list[bool]]:
        """Transcripts and, per utterance, whether every output frame was finite (NaN/Inf: a damaged model)."""
        if not waves:
            return [], []
        tensors = [torch.as_tensor(w, dtype=torch.float32).flatten() for w in waves]
        lengths = torch.tensor([t.numel() for t in tensors])
        batch = torch.zeros(len(tensors), int(lengths.max()))
        for i, t in enumerate(tensors):
            batch[i, : t.numel()] = t
        log_probs, out_lengths = self.module(batch, lengths)
        finite = [bool(torch.isfinite(lp[:n]).all()) for lp, n in zip(log_probs, out_lengths.tolist())]
        return self.decode(log_probs, out_lengths), finite


def load_exported(path: str | os.PathLike) -> ExportedModel:
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path} (give the exported model.pt of a train stage)")
    extra = {META: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not an exported asr-retune model: {exc}") from None
    if not extra[META]:
        raise ValueError(f"{path} has no {META}: not an asr-retune export")
    meta = json.loads(extra[META])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported export format {meta.get('format')!r} (expected {FORMAT})")
    module.eval()
    return ExportedModel(module, meta)
