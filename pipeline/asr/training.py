"""The one training loop, used by search trials, full training (Ray Train DDP) and tests.

:func:`train_model` runs epochs of CTC training and, after every epoch, evaluates dev
WER and hands the caller a report plus a complete checkpoint state (model, optimizer,
scheduler, RNG states, epoch). The caller decides where checkpoints go (Ray Tune,
Ray Train, or the run's storage) and passes the last one back as ``resume`` to continue.
Data order depends only on (seed, epoch), so a resumed run replays exactly what an
uninterrupted one would have done.

Under ``torch.distributed`` (Ray Train's TorchTrainer sets it up) the model is wrapped
in DDP, every rank takes its share of the batches, dev error counts are all-reduced, and
the report callback is called on every rank with a checkpoint state on rank 0 only
(``None`` elsewhere), so that only rank 0 logs and checkpoints.

On a GPU (``train.use_gpu``) the forward pass runs under autocast as ``train.amp`` says:
bf16, or fp16 with a gradient scaler (an overflowed step is skipped, its scale halved).
On CPU training is float32.

:func:`resolve_hparams` gives the model and train settings a trial or full training uses:
the configuration's, with a search point's keys laid on top.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.asr.metrics import score_pairs
from pipeline.asr.augment import ONLINE_PARAMS
from pipeline.asr.model import ASRModel
from pipeline.asr.vocab import decode_ids, encode_text, vocab_size
from pipeline.config import AugmentConfig, Config, ModelConfig, TrainConfig


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became non-finite or exploded; ``status`` is ``diverged``."""

    status = "diverged"


class TrainingOutOfMemory(RuntimeError):
    status = "oom"


MAX_OVERFLOW_SKIPS = 16  # fp16: consecutive steps skipped for inf/nan gradients (scale / 2**16) before it is divergence


class FeatureDataset(Protocol):
    """What the loop needs from data: log-mel features and transcripts by index."""

    def __len__(self) -> int: ...

    def frames(self) -> np.ndarray: ...

    def features(self, i: int) -> np.ndarray: ...  # [frames, n_mels] float

    def text(self, i: int) -> str: ...

    def for_epoch(self, seed: int, epoch: int) -> "FeatureDataset": ...  # the data one epoch trains on


@dataclass
class EpochReport:
    epoch: int  # 1-based: epochs completed
    train_loss: float
    dev_wer: float
    dev_cer: float
    dev_loss: float
    lr: float
    grad_norm: float
    seconds: float
    utts_per_s: float
    n_train: int
    n_dev: int

    def metrics(self) -> dict[str, Any]:
        return asdict(self)


Report = Callable[[EpochReport, "dict[str, Any] | None"], None]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_batches(frames: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Length-bucketed batches in an order fixed by (seed, epoch)."""
    n = len(frames)
    if not shuffle:
        order = np.argsort(frames, kind="stable")
        return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    chunk = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, n, chunk):
        part = perm[start : start + chunk]
        part = part[np.argsort(frames[part], kind="stable")]
        batches.extend(part[i : i + batch_size].tolist() for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def collate(data: FeatureDataset, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    feats = [np.asarray(data.features(i), dtype=np.float32) for i in idx]
    lengths = torch.tensor([f.shape[0] for f in feats])
    x = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
    for j, f in enumerate(feats):
        x[j, : f.shape[0]] = torch.from_numpy(f)
    labels = [encode_text(data.text(i)) for i in idx]
    label_lengths = torch.tensor([len(t) for t in labels])
    y = torch.tensor([t for lab in labels for t in lab], dtype=torch.long)
    return x, lengths, y, label_lengths


def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """Linear scaling rule: lr × (batch × accumulation × workers) / base batch."""
    return cfg.lr * (cfg.batch_size * cfg.grad_accum * world_size) / cfg.base_batch_size


def amp_dtype(setting: str) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` gives on the current CUDA device; ``None``: float32."""
    if setting == "off":
        return None
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # native bf16: compute capability >= 8
    if setting == "bf16" and not bf16:
        raise ValueError(f"train.amp=bf16 but {torch.cuda.get_device_name()} has no bfloat16: set train.amp to auto or fp16")
    return torch.bfloat16 if setting == "bf16" or (setting == "auto" and bf16) else torch.float16


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


class Schedule:
    """Per-step LR schedule (Noam, warmup+cosine) or warmup + per-epoch reduce-on-plateau."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
        self.kind = cfg.schedule
        warm = max(1, cfg.warmup_steps)
        total = max(total_steps, warm + 1)
        if self.kind == "noam":
            fn = lambda s: min((s + 1) / warm, math.sqrt(warm / (s + 1)))  # noqa: E731
        elif self.kind == "cosine":
            fn = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / (total - warm))))  # noqa: E731
        else:
            fn = lambda s: min(1.0, (s + 1) / warm)  # noqa: E731
        self.step_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
            if self.kind == "plateau"
            else None
        )
        self._scale = 1.0

    def step(self) -> None:
        self.step_sched.step()
        if self.plateau is not None and self._scale != 1.0:
            for g, base in zip(self.step_sched.optimizer.param_groups, self.step_sched.base_lrs):
                g["lr"] = base * self.step_sched.lr_lambdas[0](self.step_sched.last_epoch) * self._scale

    def epoch_end(self, dev_wer: float) -> None:
        if self.plateau is not None:
            before = self.plateau.optimizer.param_groups[0]["lr"]
            self.plateau.step(dev_wer)
            after = self.plateau.optimizer.param_groups[0]["lr"]
            if after < before:
                self._scale *= after / before

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_sched.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "scale": self._scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_sched.load_state_dict(state["step"])
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        self._scale = float(state.get("scale", 1.0))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _unwrap(model: nn.Module) -> ASRModel:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


@torch.no_grad()
def dev_error_counts(model: nn.Module, data: FeatureDataset, batch_size: int, rank: int = 0, world: int = 1) -> tuple[float, ...]:
    """(word errors, reference words, char errors, reference chars, CTC loss sum, utterances)
    over this rank's share of ``data``."""
    was_training = model.training
    model.eval()
    batches = make_batches(data.frames(), batch_size, 0, 0, shuffle=False)[rank::world]
    totals = [0.0] * 6
    device = next(model.parameters()).device
    ctc = nn.CTCLoss(blank=0, zero_infinity=True, reduction="sum")
    for idx in batches:
        x, lengths, y, ylens = collate(data, idx)
        log_probs, out_lengths = model(x.to(device), lengths.to(device))
        totals[4] += float(ctc(log_probs.transpose(0, 1).float(), y.to(device), out_lengths, ylens.to(device)))
        totals[5] += len(idx)
        best = log_probs.argmax(-1).cpu().tolist()
        hyps = [decode_ids(ids[:n]) for ids, n in zip(best, out_lengths.cpu().tolist())]
        for counts in score_pairs([data.text(i) for i in idx], hyps):
            for k in range(4):
                totals[k] += counts[k]
    model.train(was_training)
    return tuple(totals)


def build_model(model_cfg: ModelConfig, n_mels: int, mean: np.ndarray | None = None, var: np.ndarray | None = None,
                vtlp: float = 0.0) -> ASRModel:
    model = ASRModel(model_cfg, n_mels, vocab_size(), vtlp=vtlp)
    if mean is not None and var is not None:
        model.set_normalization(torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(var, dtype=torch.float32))
    return model


def init_weights(model: nn.Module, state: dict[str, Any]) -> None:
    """Load ``state`` (a whole model's state dict: same architecture and n_mels) into ``model``;
    a mismatch raises ``RuntimeError`` naming the keys."""
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)


def resolve_hparams(config: Config, overrides: dict[str, Any] | None) -> tuple[ModelConfig, TrainConfig]:
    """Model and train settings from config, with a search winner's keys laid on top."""
    overrides = overrides or {}
    model_keys = set(ModelConfig.model_fields)
    train_keys = set(TrainConfig.model_fields)
    unknown = set(overrides) - model_keys - train_keys - {"n_mels", "win_ms", "hop_ms"} - set(ONLINE_PARAMS)
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)}: not fields of model:, train: or augment.vtlp")
    model = ModelConfig.model_validate({**config.model.model_dump(), **{k: v for k, v in overrides.items() if k in model_keys}})
    train = TrainConfig.model_validate({**config.train.model_dump(), **{k: v for k, v in overrides.items() if k in train_keys}})
    return model, train


def resolve_augment(config: Config, overrides: dict[str, Any] | None) -> AugmentConfig:
    """``augment:`` with a search winner's (or trial's) on-the-fly augmentation settings on top."""
    chosen = {k: v for k, v in (overrides or {}).items() if k in ONLINE_PARAMS}
    return AugmentConfig.model_validate({**config.augment.model_dump(), **chosen})


def train_model(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_set: FeatureDataset,
    dev_set: FeatureDataset,
    *,
    n_mels: int,
    feature_mean: np.ndarray | None = None,
    feature_var: np.ndarray | None = None,
    resume: dict[str, Any] | None = None,
    report: Report | None = None,
    max_epochs: int | None = None,
    stop_after_batches: int | None = None,
    augment: AugmentConfig | None = None,
    init_state: dict[str, Any] | None = None,
) -> tuple[ASRModel, list[EpochReport]]:
    """Train for ``train_cfg.epochs`` (or ``max_epochs``) epochs; return the model and the reports.

    ``augment`` (training only): the mel-axis warp in the model, and a train set with
    augmented copies (``for_epoch``) gives each epoch its own pick of them.

    ``init_state`` (a model state dict, e.g. production's weights) initialises the model before
    training when there is no ``resume`` state; a resumed run continues from its checkpoint instead.

    ``stop_after_batches`` simulates a crash mid-epoch (tests): it raises ``KeyboardInterrupt``
    after that many optimizer batches in the current call.
    """
    vtlp = augment.vtlp if augment is not None else 0.0
    loop = _Loop(model_cfg, train_cfg, train_set.frames(), n_mels, feature_mean, feature_var, max_epochs, vtlp)
    if resume is not None:
        loop.restore(resume)
    elif init_state is not None:
        init_weights(loop.model, init_state)
    if loop.world > 1:
        loop.model = nn.parallel.DistributedDataParallel(loop.model, broadcast_buffers=False)  # buffers are constants
    for epoch in range(loop.start_epoch, loop.epochs):
        t0 = time.perf_counter()
        totals = loop.train_epoch(train_set, epoch, stop_after_batches)
        rep = loop.evaluate(dev_set, epoch, t0, *totals)
        loop.history.append(rep)
        if report is not None:
            # every rank reports (Ray Train's report is a barrier); only rank 0 carries a checkpoint
            report(rep, copy.deepcopy(loop.checkpoint_state(epoch)) if loop.rank == 0 else None)
    return _unwrap(loop.model), loop.history


class _Loop:
    """The state of one :func:`train_model` call: model, optimizer, schedule, device and ranks."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, frames: np.ndarray, n_mels: int,
                 mean: np.ndarray | None, var: np.ndarray | None, max_epochs: int | None, vtlp: float = 0.0):
        self.model_cfg, self.cfg, self.frames, self.n_mels = model_cfg, cfg, frames, n_mels
        self.rank, self.world = _dist()
        seed_everything(cfg.seed)
        self.use_cuda = cfg.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.use_cuda else torch.device("cpu")
        self.model: nn.Module = build_model(model_cfg, n_mels, mean, var, vtlp).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg, effective_lr(cfg, self.world))
        self.epochs = max_epochs or cfg.epochs
        batches_per_epoch = math.ceil(len(frames) / cfg.batch_size)
        self.per_rank = max(1, batches_per_epoch // self.world)
        steps_per_epoch = max(1, self.per_rank // cfg.grad_accum)
        self.schedule = Schedule(self.optimizer, cfg, steps_per_epoch * self.epochs)
        self.amp_dtype = amp_dtype(cfg.amp) if self.use_cuda else None  # CPU: always float32
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.overflows, self.last_norm = 0, 0.0  # fp16: steps skipped in a row; the last applied step's norm
        self.ctc = nn.CTCLoss(blank=0, zero_infinity=True)
        self.start_epoch = 0
        self.history: list[EpochReport] = []
        self.done_batches = 0  # in this call, for stop_after_batches

    def restore(self, resume: dict[str, Any]) -> None:
        """Continue from a checkpoint state: weights, optimizer, schedule, epoch, history and RNGs."""
        self.model.load_state_dict(resume["model"])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.schedule.load_state_dict(resume["schedule"])
        if self.scaler is not None and resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        self.start_epoch = int(resume["epoch"])
        self.history = [EpochReport(**h) for h in resume.get("history", [])]
        _set_rng(resume["rng"])

    def train_epoch(self, train_set: FeatureDataset, epoch: int, stop_after_batches: int | None) -> tuple[float, int, int, float]:
        """One epoch over this rank's batches; returns (loss sum, losses, utterances, last grad norm)."""
        cfg = self.cfg
        self.model.train()
        batches = make_batches(self.frames, cfg.batch_size, cfg.seed, epoch)
        batches = batches[: self.per_rank * self.world][self.rank :: self.world]
        train_set = train_set.for_epoch(cfg.seed, epoch)  # with augmented copies: this epoch's pick
        loss_sum, n_loss, n_utts, grad_norm = 0.0, 0, 0, 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for b, idx in enumerate(batches):
            loss_sum += self._backward(train_set, idx, epoch, b)
            n_loss += 1
            n_utts += len(idx)
            if (b + 1) % cfg.grad_accum == 0 or b + 1 == len(batches):
                grad_norm = self._step(epoch, b)
            self.done_batches += 1
            if stop_after_batches is not None and self.done_batches >= stop_after_batches:
                raise KeyboardInterrupt(f"simulated crash after {self.done_batches} batches")
        return loss_sum, n_loss, n_utts, grad_norm

    def _backward(self, train_set: FeatureDataset, idx: list[int], epoch: int, b: int) -> float:
        """Forward and backward of one batch; its loss. Non-finite loss: diverged; out of memory: oom."""
        x, lengths, y, ylens = collate(train_set, idx)
        device = self.device
        try:
            with torch.autocast("cuda", dtype=self.amp_dtype or torch.float16, enabled=self.amp_dtype is not None):
                log_probs, out_lengths = self.model(x.to(device), lengths.to(device))
                loss = self.ctc(log_probs.transpose(0, 1).float(), y.to(device), out_lengths, ylens.to(device))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, batch {b + 1}")
            scaled = loss / self.cfg.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        except RuntimeError as exc:
            if _is_oom(exc):
                raise TrainingOutOfMemory(
                    f"out of memory at batch_size={self.cfg.batch_size} "
                    f"(longest utterance {int(lengths.max())} frames): lower train.batch_size and raise train.grad_accum"
                ) from None
            raise
        return loss.item()

    def _step(self, epoch: int, b: int) -> float:
        """Clip, check and apply the accumulated gradients; their norm. An exploding norm: diverged.

        With fp16 a non-finite norm is first an overflow of the loss scale: the step is skipped and
        the scale halved, and only :data:`MAX_OVERFLOW_SKIPS` such steps in a row are divergence."""
        cfg = self.cfg
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm))
        if self.scaler and not math.isfinite(norm) and self.overflows < MAX_OVERFLOW_SKIPS:
            self.overflows += 1
            self.scaler.step(self.optimizer)  # unscale_ found the inf/nan: this skips the update
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return self.last_norm
        if not math.isfinite(norm) or norm > cfg.max_grad_norm_abort:
            raise TrainingDiverged(
                f"gradient norm {norm:.3g} exceeds train.max_grad_norm_abort={cfg.max_grad_norm_abort:g} "
                f"at epoch {epoch + 1}, batch {b + 1}"
            )
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.overflows, self.last_norm = 0, norm
        return norm

    def evaluate(self, dev_set: FeatureDataset, epoch: int, started: float,
                 loss_sum: float, n_loss: int, n_utts: int, grad_norm: float) -> EpochReport:
        """Dev WER/CER/loss after an epoch (summed over ranks), the schedule's epoch step, the report
        (``seconds``: since ``started``, dev evaluation included)."""
        # the bare module: a DDP forward is a collective, and ranks may hold different dev batch counts
        dev = dev_error_counts(_unwrap(self.model), dev_set, self.cfg.batch_size, self.rank, self.world)
        totals = torch.tensor([*dev, loss_sum, n_loss, n_utts], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        errs, words, cerrs, chars, dev_loss_sum, dev_n, loss_sum, n_loss, n_utts = totals.tolist()
        dev_wer = errs / words if words else math.nan
        seconds = time.perf_counter() - started
        self.schedule.epoch_end(dev_wer)
        return EpochReport(
            epoch=epoch + 1,
            train_loss=loss_sum / max(1, n_loss),
            dev_wer=dev_wer,
            dev_cer=cerrs / chars if chars else math.nan,
            dev_loss=dev_loss_sum / dev_n if dev_n else math.nan,
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            seconds=seconds,
            utts_per_s=n_utts / seconds if seconds else 0.0,
            n_train=int(n_utts),
            n_dev=len(dev_set),
        )

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        """A complete state after ``epoch``: what :meth:`restore` and :func:`load_checkpoint_model` read."""
        state = {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": epoch + 1,
            "rng": _get_rng(),
            "history": [h.metrics() for h in self.history],
            "model_cfg": self.model_cfg.model_dump(),
            "train_cfg": self.cfg.model_dump(),
            "n_mels": self.n_mels,
        }
        if self.scaler is not None:  # fp16 on a GPU: the loss scale continues too
            state["scaler"] = self.scaler.state_dict()
        return state


def _get_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint_model(state: dict[str, Any]) -> ASRModel:
    """Rebuild the model from a checkpoint state written by :func:`train_model`."""
    model = ASRModel(ModelConfig(**state["model_cfg"]), int(state["n_mels"]), vocab_size())
    model.load_state_dict(state["model"])
    return model.eval()

