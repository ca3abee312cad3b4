"""The names asr-retune gives MLflow objects: tag keys, alias names, the model's file name.

Tag keys follow the search stage's (``asr_run_id``, ``asr_kind``): plain keys, no quoting
in filters.
"""

from __future__ import annotations

TAG_RUN_ID = "asr_run_id"
TAG_KIND = "asr_kind"
TAG_SHA256 = "asr_sha256"
TAG_POOL = "asr_pool_version"
TAG_GOLDEN = "asr_golden_version"
TAG_CONFIG_HASH = "asr_config_hash"
TAG_CODE = "asr_code_version"
TAG_LOGGED = "asr_logged"
PRODUCTION = "production"
CHALLENGER = "challenger"
MODEL_FILE = "model.pt"
