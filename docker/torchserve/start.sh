#!/usr/bin/env bash
# Start TorchServe in the foreground (PID 1 via exec).
#   ASR_MODEL_URI     optional: s3://bucket/key.mar or file:///path.mar, loaded as model `asr`
#   ASR_MODEL_SHA256  optional: expected sha256 of that archive (checked before loading)
# Without ASR_MODEL_URI the server starts empty; versions are registered through the
# management API (token from key_file.json in the working directory).
set -euo pipefail

store="${ASR_MODEL_STORE:-/home/model-server/model-store}"
workdir="${ASR_TS_WORKDIR:-/home/model-server/run}"
mkdir -p "$store" "$workdir"
cd "$workdir"

models=()
if [[ -n "${ASR_MODEL_URI:-}" ]]; then
  archive="$(python /usr/local/lib/asr-torchserve/fetch_model.py "$ASR_MODEL_URI" "$store")"
  models=(--models "asr=$(basename "$archive")")
fi

exec torchserve --start --foreground --ts-config "${TS_CONFIG_FILE:-/etc/torchserve/config.properties}" \
  --model-store "$store" --no-config-snapshots "${models[@]}"
