"""The incumbent: the configuration every search must beat, trained as its trial 0.

It is production's configuration, read from the registered production model (its exported
``meta.json`` holds the model, train, feature and augmentation settings it was built with),
or the configured default at a cold start (no production model). Its hyperparameters are the
fields a configuration can tune (``model:``, the optimization part of ``train:``, the front
end's ``n_mels``/``win_ms``/``hop_ms`` and ``augment.vtlp``); operational settings (epochs,
workers, seeds, retries) always come from the run's configuration. The incumbent's
hyperparameters are also the base every trial lays its point of the space on, so a trial's
configuration and the one full training gets are the same.

The first attempt of a search writes the incumbent to its work area; a retried (restored)
search reads it back, so it compares against the same incumbent even if production moved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.asr.augment import ONLINE_PARAMS
from pipeline.config import Config, ModelConfig, TrainConfig
from pipeline.run import RunContext
from pipeline.stages.search.space import FRONTEND_PARAMS, SearchSpace, filter_point
from pipeline.storage import join

INCUMBENT_KEY = "_incumbent"  # in a trial's config: the incumbent's source
WARM_START_KEY = "_warm_start"  # in a trial's config: the earlier run a warm-start point came from
PRODUCTION, CONFIG_DEFAULT = "production", "config-default"
# train: fields that say how to run training, not what to train: never taken from production
OPERATIONAL_TRAIN_KEYS = frozenset({
    "epochs", "seed", "dev_fraction", "num_workers", "use_gpu", "max_failures", "hang_timeout_s", "init",
    "max_grad_norm_abort", "amp",
})
HPARAM_KEYS = frozenset(
    set(ModelConfig.model_fields) | (set(TrainConfig.model_fields) - OPERATIONAL_TRAIN_KEYS)
    | set(FRONTEND_PARAMS) | set(ONLINE_PARAMS)
)


@dataclass
class Incumbent:
    """Where the incumbent comes from and what it is."""

    source: str  # "production" | "config-default"
    hparams: dict[str, Any]  # every tunable setting (the base of every trial)
    version: str | None = None  # production's registered version
    run_id: str | None = None  # the pipeline run that trained production
    note: str = ""

    def point(self, space: SearchSpace) -> dict[str, Any]:
        """The incumbent as a point of ``space`` (what Optuna is told it tried)."""
        return filter_point(space, self.hparams)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "hparams" and v not in (None, "")}


def config_hparams(config: Config) -> dict[str, Any]:
    """The configured default's hyperparameters."""
    out: dict[str, Any] = {**config.model.model_dump(mode="json"), **config.train.model_dump(mode="json")}
    out.update({k: getattr(config.features, k) for k in FRONTEND_PARAMS})
    out.update({k: getattr(config.augment, k) for k in ONLINE_PARAMS})
    return {k: v for k, v in out.items() if k in HPARAM_KEYS}


def hparams_from_meta(meta: dict[str, Any], config: Config) -> dict[str, Any]:
    """The hyperparameters an exported model was built with (its ``meta.json``), over the configured
    default for anything it does not record."""
    out = config_hparams(config)
    for section in ("model", "train", "augment"):
        if isinstance(meta.get(section), dict):
            out.update({k: v for k, v in meta[section].items() if k in HPARAM_KEYS})
    if isinstance(meta.get("features"), dict):
        out.update({k: v for k, v in meta["features"].items() if k in FRONTEND_PARAMS})
    elif isinstance(meta.get("frontend"), dict):  # older exports: the LogMel settings only
        fe = meta["frontend"]
        rate = float(fe.get("sample_rate") or config.audio.sample_rate)
        out["n_mels"] = int(fe.get("n_mels", out["n_mels"]))
        if fe.get("win_length"):
            out["win_ms"] = round(1000.0 * float(fe["win_length"]) / rate, 3)
        if fe.get("hop_length"):
            out["hop_ms"] = round(1000.0 * float(fe["hop_length"]) / rate, 3)
    return out


def _work_key(ctx: RunContext) -> str:
    return join("runs", ctx.run_id, "_work", "search", "incumbent.json")


def find_incumbent(ctx: RunContext, production_hparams: dict[str, Any] | None = None) -> Incumbent:
    """This run's incumbent: the one an earlier attempt recorded, else production's, else the default.

    ``production_hparams`` (tests, manual runs) stands in for the registry. An unreachable
    tracking server raises (never mistaken for a cold start).
    """
    key = _work_key(ctx)
    if ctx.store.exists(key):
        return Incumbent(**json.loads(ctx.store.get_text(key)))
    if production_hparams:
        inc = Incumbent(PRODUCTION, {**config_hparams(ctx.config),
                                     **{k: v for k, v in production_hparams.items() if k in HPARAM_KEYS}},
                        note="given by the caller")
    else:
        inc = _from_registry(ctx) or Incumbent(CONFIG_DEFAULT, config_hparams(ctx.config),
                                               note="no production model (cold start)")
    ctx.store.put_text(key, json.dumps(asdict(inc), indent=2, sort_keys=True))
    return inc


def _from_registry(ctx: RunContext) -> Incumbent | None:
    from pipeline.asr.evaluation import model_meta
    from pipeline.tracking import production_model

    prod = production_model(ctx.config.mlflow)
    if prod is None:
        return None
    meta = model_meta(prod.path)
    return Incumbent(PRODUCTION, hparams_from_meta(meta, ctx.config), version=prod.version, run_id=prod.run_id,
                     note=f"models:/{prod.name}/{prod.version} (meta.json of its exported model)")

