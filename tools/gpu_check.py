"""GPU check: the one training loop on one GPU with AMP, against the same loop on CPU.

    python tools/gpu_check.py [--utterances 2048] [--epochs 2] [--cpu-utterances 512] [--out FILE]
    python tools/gpu_check.py --allow-cpu ...   # no GPU: the CPU half only (tests)

It trains the default model (``model:`` of the configuration, ``configs/local.yaml``) with
``train:``'s settings (``use_gpu`` on, ``amp`` as configured or ``--amp``) for ``--epochs``
epochs on a generated corpus held in memory: DTMF-like tone pairs, one per digit, in noise,
transcribed as digit words. It measures throughput, not quality, and needs no download.
Features come from the project's front end (``LogMelComputer``). Then the same loop trains
on CPU over ``--cpu-utterances`` of the corpus for ``--cpu-epochs`` epochs.

Rates are the loop's own ``utts_per_s`` (an epoch's training plus its small dev pass); the
GPU figure is the last epoch's, after CUDA's warm-up. Prints one JSON object (and writes it
to ``--out``). Exit status: 0 the check passed, 1 it failed (training error, non-finite
loss), 2 no CUDA GPU is visible (without ``--allow-cpu``).

Imports only torch, torchaudio, numpy, pydantic, PyYAML and jiwer (through the loop's
metrics): no Ray, MLflow, Airflow or boto3, so it runs where only those wheels are carried
(``tools/gpu-check.sh``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchaudio

from pipeline.asr.frontend import FrontEnd, LogMelComputer
from pipeline.asr.training import EpochReport, amp_dtype, train_model
from pipeline.config import Config, load_config
from pipeline.data.dataset import ArrayDataset
from pipeline.data.text import DIGIT_WORDS

EXIT_FAILED, EXIT_NO_GPU = 1, 2
# DTMF rows and columns (Hz): digit d sounds as one low and one high tone, like a keypad
LOW_HZ = (941, 697, 697, 697, 770, 770, 770, 852, 852, 852)
HIGH_HZ = (1336, 1209, 1336, 1477, 1209, 1336, 1477, 1209, 1336, 1477)


def make_corpus(n: int, sample_rate: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` utterances of 1-5 digits: tone pairs of 0.2-0.4 s with short gaps, in white
    noise at 15-30 dB SNR, float32 mono at ``sample_rate``; their digit-word transcripts."""
    rng = np.random.default_rng(seed)
    waves, texts = [], []
    for _ in range(n):
        digits = rng.integers(0, 10, size=int(rng.integers(1, 6)))
        parts = [np.zeros(int(rng.uniform(0.05, 0.2) * sample_rate), dtype=np.float32)]
        for d in digits:
            t = np.arange(int(rng.uniform(0.2, 0.4) * sample_rate)) / sample_rate
            pitch = rng.uniform(0.97, 1.03)  # a little spread between "speakers"
            tone = np.sin(2 * np.pi * LOW_HZ[d] * pitch * t) + 0.7 * np.sin(2 * np.pi * HIGH_HZ[d] * pitch * t)
            parts.append((tone * np.hanning(t.size)).astype(np.float32))
            parts.append(np.zeros(int(rng.uniform(0.05, 0.15) * sample_rate), dtype=np.float32))
        wave = np.concatenate(parts) * rng.uniform(0.05, 0.5)
        noise_rms = np.sqrt(np.mean(wave**2)) / 10 ** (rng.uniform(15, 30) / 20)
        waves.append((wave + rng.normal(0, noise_rms, wave.size)).astype(np.float32))
        texts.append(" ".join(DIGIT_WORDS[d] for d in digits))
    return waves, texts


def featurize(config: Config, waves: list[np.ndarray]) -> list[np.ndarray]:
    """Log-mel features [frames, n_mels] of each wave, with the configuration's front end."""
    computer = LogMelComputer(FrontEnd.from_config(config.features, config.audio.sample_rate))
    out: list[np.ndarray] = []
    for start in range(0, len(waves), 256):  # batched, in chunks that keep the STFT buffer small
        feats, frames = computer.compute(waves[start:start + 256])
        out.extend(np.split(feats.astype(np.float32), np.cumsum(frames)[:-1]))
    return out


def run_loop(config: Config, train: ArrayDataset, dev: ArrayDataset, *, use_gpu: bool, epochs: int) -> dict[str, Any]:
    """Train the default model with ``train_model``; its per-epoch figures and final loss."""
    all_frames = np.concatenate([train.features(i) for i in range(len(train))])
    train_cfg = config.train.model_copy(update={"use_gpu": use_gpu, "epochs": epochs})
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, history = train_model(config.model, train_cfg, train, dev, n_mels=config.features.n_mels,
                             feature_mean=all_frames.mean(0), feature_var=all_frames.var(0))
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "utterances": len(train),
        "epochs": [_epoch(h) for h in history],
        "utts_per_s": round(history[-1].utts_per_s, 2),
        "wall_s": round(wall, 2),
        "final_train_loss": history[-1].train_loss,
        "final_train_loss_finite": math.isfinite(history[-1].train_loss),
    }
    if use_gpu:
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _epoch(h: EpochReport) -> dict[str, Any]:
    return {"epoch": h.epoch, "utts_per_s": round(h.utts_per_s, 2), "seconds": round(h.seconds, 3),
            "train_loss": round(h.train_loss, 4), "dev_wer": round(h.dev_wer, 4)}


def environment(config: Config, gpu: bool) -> dict[str, Any]:
    """What ran where: versions, the device, the AMP dtype, the model."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if gpu else None,
        "cpu_threads": torch.get_num_threads(),
        "amp": None,
        "model": config.model.model_dump(),
        "batch_size": config.train.batch_size,
    }
    if gpu:
        dtype = amp_dtype(config.train.amp)
        info["amp"] = str(dtype).removeprefix("torch.") if dtype is not None else "off"
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="configuration file (default: configs/local.yaml)")
    parser.add_argument("--utterances", type=int, default=2048, help="training utterances of the GPU run")
    parser.add_argument("--dev-utterances", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the GPU run")
    parser.add_argument("--cpu-utterances", type=int, default=512, help="the CPU run's share of the corpus")
    parser.add_argument("--cpu-epochs", type=int, default=1)
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=None,
                        help="override train.amp (default: the configuration's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-cpu", action="store_true", help="GPU run only")
    parser.add_argument("--allow-cpu", action="store_true", help="with no GPU, run the CPU half only (exit 0)")
    parser.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    for name in ("utterances", "dev_utterances", "epochs", "cpu_utterances", "cpu_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def check(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    """Build the corpus, run the GPU and the CPU halves; the result object."""
    config = load_config(args.config)
    if args.amp is not None:
        config = config.model_copy(update={"train": config.train.model_copy(update={"amp": args.amp})})
    result: dict[str, Any] = {"check": "gpu_training", **environment(config, gpu)}
    waves, texts = make_corpus(args.utterances + args.dev_utterances, config.audio.sample_rate, args.seed)
    data = ArrayDataset(featurize(config, waves), texts)
    train = data.subset(range(args.utterances))
    dev = data.subset(range(args.utterances, len(data)))
    result["corpus"] = {"kind": "generated DTMF-like digit tones in noise", "train": len(train), "dev": len(dev),
                        "seconds": round(sum(w.size for w in waves) / config.audio.sample_rate, 1)}
    result["gpu"] = run_loop(config, train, dev, use_gpu=True, epochs=args.epochs) if gpu else None
    if not args.skip_cpu:
        cpu_train = train.subset(range(min(args.cpu_utterances, len(train))))
        result["cpu"] = run_loop(config, cpu_train, dev, use_gpu=False, epochs=args.cpu_epochs)
    else:
        result["cpu"] = None
    gpu_rate = result["gpu"]["utts_per_s"] if result["gpu"] else None
    cpu_rate = result["cpu"]["utts_per_s"] if result["cpu"] else None
    result.update(gpu_utts_per_s=gpu_rate, cpu_utts_per_s=cpu_rate,
                  ratio=round(gpu_rate / cpu_rate, 2) if gpu_rate and cpu_rate else None)
    runs = [r for r in (result["gpu"], result["cpu"]) if r is not None]
    result["ok"] = bool(runs) and all(r["final_train_loss_finite"] and r["utts_per_s"] > 0 for r in runs)
    return result


def emit(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        message = (f"no CUDA GPU visible to torch {torch.__version__} (built for CUDA {torch.version.cuda}): "
                   "run this on the GPU machine, or pass --allow-cpu for the CPU half only")
        emit({"check": "gpu_training", "ok": False, "error": message}, args.out)
        print(f"gpu-check: {message}", file=sys.stderr)
        return EXIT_NO_GPU
    try:
        result = check(args, gpu)
    except (RuntimeError, ValueError) as exc:  # TrainingDiverged, TrainingOutOfMemory, a bad config
        emit({"check": "gpu_training", "ok": False, "error": f"{type(exc).__name__}: {exc}"}, args.out)
        print(f"gpu-check: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    emit(result, args.out)
    return 0 if result["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
