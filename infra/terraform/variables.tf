variable "region" {
  description = "AWS region of the bucket and the EKS cluster."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "The pipeline's bucket (storage.root s3://<bucket>/pipeline in configs/production.example.yaml)."
  type        = string
  default     = "asr-retune-prod"
}

variable "oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (IRSA), e.g. arn:aws:iam::111122223333:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE."
  type        = string
}

variable "oidc_provider_url" {
  description = "The OIDC issuer without https://, e.g. oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE."
  type        = string
}

variable "pipeline_prefix" {
  description = "Prefix of runs/ and state/ (the part after the bucket in storage.root)."
  type        = string
  default     = "pipeline"
}

variable "mlflow_artifacts_prefix" {
  description = "Prefix of MLflow artifacts (mlflow.artifact_root)."
  type        = string
  default     = "mlflow-artifacts"
}

variable "airflow_logs_prefix" {
  description = "Prefix of Airflow's remote task logs."
  type        = string
  default     = "airflow-logs"
}

variable "run_retention_days" {
  description = "Days a run's partition (pipeline/runs/) is kept; state/ and models/ never expire."
  type        = number
  default     = 180
}

variable "noncurrent_version_retention_days" {
  description = "Days an overwritten or deleted object version is kept (undo window)."
  type        = number
  default     = 30
}

variable "service_accounts" {
  description = "Kubernetes service accounts (namespace/name) allowed to assume each role through IRSA; they match infra/k8s and infra/helm."
  type = object({
    ray            = list(string)
    airflow_worker = list(string)
    airflow        = list(string)
    mlflow         = list(string)
    torchserve     = list(string)
  })
  default = {
    ray            = ["ray/asr-retune-ray"]
    airflow_worker = ["airflow/airflow-worker"]
    airflow        = ["airflow/airflow-scheduler", "airflow/airflow-api-server", "airflow/airflow-dag-processor", "airflow/airflow-triggerer"]
    mlflow         = ["mlflow/mlflow"]
    torchserve     = ["asr-retune/torchserve"]
  }
}
