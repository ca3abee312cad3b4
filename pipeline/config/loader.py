"""The whole configuration (:class:`Config`) and how it is loaded: YAML file, then environment overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config import sections as sec
from pipeline.config import serving as srv
from pipeline.config.base import PROJECT_ROOT, Section

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "local.yaml"
ENV_FILE = "ASR_RETUNE_CONFIG"
ENV_PREFIX = "ASR_RETUNE__"


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message says which field."""


class Config(Section):
    """The whole configuration: one field per section of the YAML file."""

    storage: sec.StorageConfig = sec.StorageConfig()
    audio: sec.AudioConfig = sec.AudioConfig()
    demo: sec.DemoConfig = sec.DemoConfig()
    ingest: sec.IngestConfig = sec.IngestConfig()
    features: sec.FeatureConfig = sec.FeatureConfig()
    augment: sec.AugmentConfig = sec.AugmentConfig()
    proxy: sec.ProxyConfig = sec.ProxyConfig()
    model: sec.ModelConfig = sec.ModelConfig()
    train: sec.TrainConfig = sec.TrainConfig()
    search: sec.SearchConfig = sec.SearchConfig()
    gate: sec.GateConfig = sec.GateConfig()
    orchestration: sec.OrchestrationConfig = sec.OrchestrationConfig()
    serving: srv.ServingConfig = srv.ServingConfig()
    canary: srv.CanaryConfig = srv.CanaryConfig()
    ray: sec.RayConfig = sec.RayConfig()
    mlflow: sec.MlflowConfig = sec.MlflowConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node[path[-1]] = raw if value is None and raw != "" else value
    return data


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field (value {shown}); check the spelling")
        else:
            lines.append(f"  {field}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def resolve_config_path(path: str | os.PathLike | None = None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get(ENV_FILE)
    return Path(env) if env else DEFAULT_CONFIG


def load_config(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load and validate the configuration; raise :class:`ConfigError` with the bad field named."""
    file = resolve_config_path(path)
    if not file.exists():
        raise ConfigError(f"configuration file not found: {file} (pass --config FILE or set {ENV_FILE})")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {file} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {file} must hold a mapping at the top, got {type(data).__name__}")
    data = _apply_env(data, dict(os.environ if environ is None else environ))
    return config_from_dict(data, source=str(file))
