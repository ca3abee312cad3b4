"""One trial: the one training loop on the proxy (or, for the fidelity check, on the full pool).

A Tune function trainable. Its configuration is a point of the search space laid on the
incumbent's hyperparameters (``data["base"]``); it reports dev WER, CER, loss and the search
``score`` every epoch (ASHA decides at the rungs) and checkpoints only at the rungs
(``data["checkpoint_epochs"]``), so a preempted trial restarts from its last rung. A trial restored with a
checkpoint of its last epoch (the driver died after it finished) reports that epoch again and
ends, so the experiment records its result. Features
are shared, not reloaded: the feature index travels once through Ray's object store
(``tune.with_parameters``) and every trial memory-maps the same shards of the local feature
cache (:class:`pipeline.data.features.FeatureStore`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.stages.search.space import FRONTEND_PARAMS

STATE_FILE = "state.pt"
DIVERGED_WER = 10.0  # reported for a diverged trial: worse than any real WER


def frontend_key(n_mels: int, win_ms: float, hop_ms: float) -> str:
    return f"{int(n_mels)}/{float(win_ms):g}/{float(hop_ms):g}"


def score(dev_wer: float, dev_cer: float, dev_loss: float) -> float:
    """What the search minimizes: dev WER (CER/1000 breaks ties) where the model decodes (WER < 1);
    else ``1.01 + loss / (loss + 100)`` (in [1.01, 2.01)): worse than any decoding trial, ordered by
    CTC dev loss (per utterance), so trials that still output only blanks are not tied."""
    if math.isfinite(dev_wer) and dev_wer < 1.0:
        return dev_wer + 1e-3 * min(max(dev_cer, 0.0), 1.0)
    loss = max(dev_loss, 0.0) if math.isfinite(dev_loss) else 1e9
    return 1.01 + loss / (loss + 100.0)


def trial_hparams(params: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A trial's hyperparameters: its point (markers like ``_incumbent`` dropped) over the base."""
    return {**base, **{k: v for k, v in params.items() if not k.startswith("_")}}


def run_trial(params: dict[str, Any], data: dict[str, Any]) -> None:
    """Tune function trainable: train, report every epoch, checkpoint at the rungs."""
    import torch
    from ray import tune

    from pipeline.asr.training import TrainingDiverged, resolve_augment, resolve_hparams, train_model
    from pipeline.data.dataset import IndexedFeatures
    from pipeline.data.features import FeatureStore
    from pipeline.storage import open_store

    torch.set_num_threads(max(1, int(data["threads"])))
    config = Config.model_validate(data["config"])
    hp = trial_hparams(params.get("_fidelity", params), data["base"])
    part = data["frontends"][frontend_key(*(hp[k] for k in FRONTEND_PARAMS))]
    fs = FeatureStore(open_store(data["root"], config.storage), part["index"])
    split = data.get("split", "proxy")
    train_set, dev_set = IndexedFeatures(fs, part[f"{split}_train"]), IndexedFeatures(fs, part[f"{split}_dev"])
    model_cfg, train_cfg = resolve_hparams(config, {k: v for k, v in hp.items() if k not in FRONTEND_PARAMS})
    train_cfg = train_cfg.model_copy(update={
        "seed": int(data["seed"]), "warmup_steps": int(round(train_cfg.warmup_steps * float(data["warmup_scale"]))),
        # the fidelity check stands in for DDP with one worker: the same global batch, so the same learning rate
        "batch_size": train_cfg.batch_size * int(data.get("batch_scale", 1)),
    })
    checkpoint_epochs = set(data["checkpoint_epochs"])

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    last_epoch = int(resume["epoch"]) if resume else 0
    resumed_from = last_epoch  # > 0: this attempt continues a preempted one from its checkpoint

    def metrics_of(rep: dict[str, Any]) -> dict[str, Any]:
        return {**rep, "score": score(rep["dev_wer"], rep["dev_cer"], rep["dev_loss"]), "diverged": False,
                "resumed_from": resumed_from, "pid": os.getpid()}

    def report(rep, state):
        nonlocal last_epoch
        last_epoch = rep.epoch
        if rep.epoch not in checkpoint_epochs:
            tune.report(metrics_of(rep.metrics()))
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            tune.report(metrics_of(rep.metrics()), checkpoint=tune.Checkpoint.from_directory(d))

    if resume is not None and last_epoch >= int(data["max_epochs"]) and resume.get("history"):
        tune.report(metrics_of(resume["history"][-1]))  # finished before the driver died: say so again
        return
    try:
        train_model(
            model_cfg, train_cfg, train_set, dev_set,
            n_mels=fs.n_mels, feature_mean=fs.mean, feature_var=fs.var,
            resume=resume, report=report, max_epochs=int(data["max_epochs"]), augment=resolve_augment(config, hp),
        )
    except TrainingDiverged as exc:
        tune.report({"epoch": last_epoch + 1, "dev_wer": DIVERGED_WER, "dev_cer": DIVERGED_WER, "dev_loss": 1e9,
                     "score": DIVERGED_WER, "diverged": True, "status_message": str(exc)})
