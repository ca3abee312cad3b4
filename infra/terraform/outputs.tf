output "bucket" {
  description = "The pipeline's bucket (storage.root = s3://<bucket>/pipeline)."
  value       = aws_s3_bucket.pipeline.bucket
}

output "kms_key_arn" {
  description = "KMS key encrypting the bucket."
  value       = aws_kms_key.bucket.arn
}

output "role_arns" {
  description = "IRSA role per component: put each into the eks.amazonaws.com/role-arn annotation of its service accounts (infra/k8s overlay, infra/helm/airflow-values.yaml)."
  value       = { for k, r in aws_iam_role.component : k => r.arn }
}
