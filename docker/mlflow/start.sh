#!/usr/bin/env bash
# Start the MLflow tracking server.
#   MLFLOW_BACKEND_STORE_URI       postgresql://user:password@host:5432/mlflow (compose, env file)
#   MLFLOW_BACKEND_STORE_URI_FILE  a file holding that URI (Kubernetes Secret mounted read-only)
#   MLFLOW_ARTIFACTS_DESTINATION   s3://bucket/mlflow-artifacts
# S3 credentials come from boto3's default chain (IRSA on Kubernetes; env file in compose).
set -euo pipefail

if [[ -n "${MLFLOW_BACKEND_STORE_URI_FILE:-}" ]]; then
  MLFLOW_BACKEND_STORE_URI="$(<"$MLFLOW_BACKEND_STORE_URI_FILE")"
fi
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI or MLFLOW_BACKEND_STORE_URI_FILE}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
export MLFLOW_BACKEND_STORE_URI

# --serve-artifacts: clients upload/download artifacts through the server (mlflow-artifacts:/),
# so only the server's role needs the artifacts prefix.
exec mlflow server \
  --host 0.0.0.0 --port 5000 \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --workers "${MLFLOW_WORKERS:-2}" \
  ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"}
