"""All MLflow plumbing of the pipeline: connection, lineage, the training run, registered
versions and alias moves.

* :mod:`~pipeline.tracking.connection` — tracking URI, experiments, the shared client.
* :mod:`~pipeline.tracking.names` — tag keys, alias names, the model's file name.
* :mod:`~pipeline.tracking.lineage` — the tags that say what a model was built from.
* :mod:`~pipeline.tracking.runs` — the MLflow run of a pipeline run, and the gate's logging.
* :mod:`~pipeline.tracking.models` — registered versions: lookup, logging, download, ``models:/`` URIs.
* :mod:`~pipeline.tracking.promotion` — alias moves (promote, rollback) and their recorded history.

Core: it imports no stage, model, data or serving code. MLflow itself is imported lazily.
"""

from pipeline.tracking.connection import (
    SEARCH_EXPERIMENT,
    client,
    experiment_id,
    mlflow_context,
    quiet_mlflow,
    setup_mlflow,
    tracking_uri,
)
from pipeline.tracking.lineage import code_version, config_hash, lineage_tags
from pipeline.tracking.models import (
    RegisteredModel,
    RegistryError,
    aliases,
    ensure_registered_model,
    find_version_for_run,
    get_version,
    log_pyfunc_model,
    production_model,
    resolve_model_uri,
)
from pipeline.tracking.names import (
    CHALLENGER,
    MODEL_FILE,
    PRODUCTION,
    TAG_CODE,
    TAG_CONFIG_HASH,
    TAG_GOLDEN,
    TAG_KIND,
    TAG_LOGGED,
    TAG_POOL,
    TAG_RUN_ID,
    TAG_SHA256,
)
from pipeline.tracking.promotion import (
    HISTORY_KEY,
    actor,
    history,
    move_alias,
    production_stack,
    promote,
    registry_history,
    rollback,
)
from pipeline.tracking.runs import find_training_run, log_gate, training_run

__all__ = [
    "CHALLENGER",
    "HISTORY_KEY",
    "MODEL_FILE",
    "PRODUCTION",
    "SEARCH_EXPERIMENT",
    "TAG_CODE",
    "TAG_CONFIG_HASH",
    "TAG_GOLDEN",
    "TAG_KIND",
    "TAG_LOGGED",
    "TAG_POOL",
    "TAG_RUN_ID",
    "TAG_SHA256",
    "RegisteredModel",
    "RegistryError",
    "actor",
    "aliases",
    "client",
    "code_version",
    "config_hash",
    "ensure_registered_model",
    "experiment_id",
    "find_training_run",
    "find_version_for_run",
    "get_version",
    "history",
    "lineage_tags",
    "log_gate",
    "log_pyfunc_model",
    "mlflow_context",
    "move_alias",
    "production_model",
    "production_stack",
    "promote",
    "quiet_mlflow",
    "registry_history",
    "resolve_model_uri",
    "rollback",
    "setup_mlflow",
    "tracking_uri",
    "training_run",
]
