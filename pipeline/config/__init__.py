"""Typed configuration: YAML file + environment overrides, validated with pydantic.

Load order: defaults in the section models <- YAML file <- environment variables.
An environment variable ``ASR_RETUNE__SECTION__FIELD=value`` overrides
``section.field`` (the value is parsed as YAML, so ``8``, ``true`` and ``[1, 2]``
keep their types). ``ASR_RETUNE_CONFIG`` names the file when ``--config`` is not
given; the default is ``configs/local.yaml`` in the project.

A bad file fails with :class:`ConfigError` naming the field and the bad value.

* :mod:`pipeline.config.base` -- the section base model, the project root
* :mod:`pipeline.config.sections` -- storage, data, features, model, training, search, gate, Ray, MLflow
* :mod:`pipeline.config.serving` -- TorchServe, its router (nginx / Istio) and the canary
* :mod:`pipeline.config.loader` -- :class:`Config` and :func:`load_config`

Import every name from here: ``from pipeline.config import Config, ServingConfig``.
"""

from pipeline.config.base import PROJECT_ROOT, project_path
from pipeline.config.loader import DEFAULT_CONFIG, ENV_FILE, ENV_PREFIX, Config, ConfigError, config_from_dict, load_config, resolve_config_path
from pipeline.config.sections import (
    AudioConfig,
    AugmentConfig,
    DemoConfig,
    FeatureConfig,
    GateConfig,
    IngestConfig,
    LocalClusterConfig,
    MlflowConfig,
    ModelConfig,
    OrchestrationConfig,
    ProxyConfig,
    RayConfig,
    SearchConfig,
    StorageConfig,
    TrainConfig,
)
from pipeline.config.serving import MODEL_NAME_RE, VERSION_RE, CanaryConfig, IstioConfig, NginxConfig, ServingConfig

__all__ = [
    "DEFAULT_CONFIG", "ENV_FILE", "ENV_PREFIX", "MODEL_NAME_RE", "PROJECT_ROOT", "VERSION_RE",
    "AudioConfig", "AugmentConfig", "CanaryConfig", "Config", "ConfigError", "DemoConfig", "FeatureConfig", "GateConfig",
    "IngestConfig", "IstioConfig", "LocalClusterConfig", "MlflowConfig", "ModelConfig", "NginxConfig", "OrchestrationConfig",
    "ProxyConfig", "RayConfig", "SearchConfig", "ServingConfig", "StorageConfig", "TrainConfig",
    "config_from_dict", "load_config", "project_path", "resolve_config_path",
]
