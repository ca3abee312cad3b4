"""The hyperparameter search space, from YAML (``configs/search_space.yaml``).

Kinds: ``loguniform``/``uniform`` {low, high}, ``int`` {low, high, step}, ``choice``
{values}; ``when: {param: value-or-list}`` makes a parameter conditional on an earlier
one. :func:`suggest` is Optuna's define-by-run form (used through Ray Tune's
``OptunaSearch``); :func:`filter_point` trims a known configuration (production's, an
earlier run's best) to a valid point of this space. :meth:`SearchSpace.frontends` lists the
front ends the space can choose (each gets its feature cache before the trials start).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pipeline.asr.augment import ONLINE_PARAMS
from pipeline.config import FeatureConfig, ModelConfig, TrainConfig

FRONTEND_PARAMS = ("n_mels", "win_ms", "hop_ms")
KNOWN_PARAMS = set(ModelConfig.model_fields) | set(TrainConfig.model_fields) | set(FRONTEND_PARAMS) | set(ONLINE_PARAMS)


class SpaceError(ValueError):
    """The search space file is invalid; the message names the key."""


class ParamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    step: int | None = None
    values: list[Any] | None = None
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "ParamSpec":
        if self.kind == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("choice takes 'values', not low/high")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.kind} needs 'low' and 'high'")
            if self.low >= self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.kind == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {self.low})")
            if self.kind == "int":
                if float(self.low) != int(self.low) or float(self.high) != int(self.high):
                    raise ValueError("int bounds must be whole numbers")
                if self.step is not None and self.step < 1:
                    raise ValueError("int step must be >= 1")
            elif self.step is not None:
                raise ValueError(f"'step' applies to int, not {self.kind}")
        return self

    def active(self, chosen: dict[str, Any]) -> bool:
        for key, want in (self.when or {}).items():
            allowed = want if isinstance(want, list) else [want]
            if chosen.get(key) not in allowed:
                return False
        return True

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in (self.values or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if not (self.low <= value <= self.high):  # type: ignore[operator]
            return False
        if self.kind == "int":
            return value == int(value) and (int(value) - int(self.low)) % (self.step or 1) == 0  # type: ignore[arg-type]
        return True


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: dict[str, ParamSpec]

    @model_validator(mode="after")
    def _names(self) -> "SearchSpace":
        seen: list[str] = []
        for name, spec in self.params.items():
            if name not in KNOWN_PARAMS:
                raise ValueError(f"params.{name}: unknown hyperparameter (not a field of model:, train: or the front end)")
            if name in FRONTEND_PARAMS and spec.kind != "choice":
                raise ValueError(f"params.{name}: front-end parameters must be 'choice' (one feature cache per value)")
            for dep in spec.when or {}:
                if dep not in seen:
                    raise ValueError(f"params.{name}.when: '{dep}' must be a parameter defined before '{name}'")
            seen.append(name)
        return self

    def frontends(self, base: FeatureConfig) -> list[FeatureConfig]:
        """Every front-end setting the space can choose (the search pre-builds each cache)."""
        combos = [base]
        for name in FRONTEND_PARAMS:
            spec = self.params.get(name)
            if spec is None:
                continue
            combos = [c.model_copy(update={name: v}) for c in combos for v in spec.values or []]
        unique: dict[str, FeatureConfig] = {}
        for c in combos:
            unique[c.model_dump_json()] = c
        return list(unique.values())


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.exists():
        raise SpaceError(f"search space file not found: {path} (set search.space_file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path} is not valid YAML: {exc}") from None
    try:
        return SearchSpace.model_validate(data or {})
    except ValidationError as err:
        lines = [f"invalid search space ({path}):"]
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
        raise SpaceError("\n".join(lines)) from None


def suggest(space: SearchSpace, trial, only: set[str] | None = None) -> None:
    """Optuna define-by-run: suggest every active parameter in order (``only``: just those)."""
    chosen: dict[str, Any] = {}
    for name, spec in space.params.items():
        if not spec.active(chosen) or (only is not None and name not in only):
            continue
        if spec.kind == "choice":
            value = trial.suggest_categorical(name, spec.values)
        elif spec.kind == "int":
            value = trial.suggest_int(name, int(spec.low), int(spec.high), step=spec.step or 1)
        else:
            value = trial.suggest_float(name, spec.low, spec.high, log=spec.kind == "loguniform")
        chosen[name] = value


def filter_point(space: SearchSpace, config: dict[str, Any]) -> dict[str, Any]:
    """The part of ``config`` that is a valid point of the space (invalid or inactive keys dropped)."""
    point: dict[str, Any] = {}
    for name, spec in space.params.items():
        if name in config and spec.active(point) and spec.contains(config[name]):
            point[name] = config[name]
    return point


def optuna_distributions(space: SearchSpace) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for name, spec in space.params.items():
        if spec.kind == "choice":
            out[name] = d.CategoricalDistribution(spec.values)
        elif spec.kind == "int":
            out[name] = d.IntDistribution(int(spec.low), int(spec.high), step=spec.step or 1)
        else:
            out[name] = d.FloatDistribution(spec.low, spec.high, log=spec.kind == "loguniform")
    return out
