# One IAM role per component, assumable only by that component's Kubernetes service
# accounts through IRSA (web identity, audience sts.amazonaws.com), each limited to the
# bucket prefixes it needs:
#   ray             read/write pipeline/ (runs, state, models) and mlflow-artifacts/
#   airflow_worker  the DAG's task pods: read/write pipeline/ (stage markers, deploy copies
#                   archives to pipeline/models/), mlflow-artifacts/, its task logs
#   airflow         scheduler/api-server/dag-processor/triggerer: read gate reports
#                   (pipeline/runs/*/gate/), read/write task logs
#   mlflow          read/write mlflow-artifacts/ (the server proxies artifacts)
#   torchserve      read model archives under pipeline/models/

locals {
  bucket_arn = aws_s3_bucket.pipeline.arn
  pipeline   = "${local.bucket_arn}/${var.pipeline_prefix}"
  mlflow     = "${local.bucket_arn}/${var.mlflow_artifacts_prefix}"
  logs       = "${local.bucket_arn}/${var.airflow_logs_prefix}"

  components = {
    ray = {
      service_accounts = var.service_accounts.ray
      list_prefixes    = ["${var.pipeline_prefix}/*", "${var.mlflow_artifacts_prefix}/*"]
      read             = ["${local.pipeline}/*", "${local.mlflow}/*"]
      write            = ["${local.pipeline}/*", "${local.mlflow}/*"]
    }
    airflow_worker = {
      service_accounts = var.service_accounts.airflow_worker
      list_prefixes    = ["${var.pipeline_prefix}/*", "${var.mlflow_artifacts_prefix}/*", "${var.airflow_logs_prefix}/*"]
      read             = ["${local.pipeline}/*", "${local.mlflow}/*", "${local.logs}/*"]
      write            = ["${local.pipeline}/*", "${local.mlflow}/*", "${local.logs}/*"]
    }
    airflow = {
      service_accounts = var.service_accounts.airflow
      list_prefixes    = ["${var.pipeline_prefix}/runs/*", "${var.airflow_logs_prefix}/*"]
      read             = ["${local.pipeline}/runs/*/gate/*", "${local.logs}/*"]
      write            = ["${local.logs}/*"]
    }
    mlflow = {
      service_accounts = var.service_accounts.mlflow
      list_prefixes    = ["${var.mlflow_artifacts_prefix}/*"]
      read             = ["${local.mlflow}/*"]
      write            = ["${local.mlflow}/*"]
    }
    torchserve = {
      service_accounts = var.service_accounts.torchserve
      list_prefixes    = []
      read             = ["${local.pipeline}/models/*"]
      write            = []
    }
  }
}

data "aws_iam_policy_document" "irsa_trust" {
  for_each = local.components

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:sub"
      values   = [for sa in each.value.service_accounts : "system:serviceaccount:${replace(sa, "/", ":")}"]
    }
  }
}

resource "aws_iam_role" "component" {
  for_each = local.components

  name                 = "asr-retune-${replace(each.key, "_", "-")}"
  description          = "asr-retune ${each.key} (IRSA)"
  assume_role_policy   = data.aws_iam_policy_document.irsa_trust[each.key].json
  max_session_duration = 3600
}

data "aws_iam_policy_document" "component" {
  for_each = local.components

  dynamic "statement" {
    for_each = length(each.value.list_prefixes) > 0 ? [1] : []
    content {
      sid       = "ListOwnPrefixes"
      actions   = ["s3:ListBucket"]
      resources = [local.bucket_arn]
      condition {
        test     = "StringLike"
        variable = "s3:prefix"
        values   = each.value.list_prefixes
      }
    }
  }

  statement {
    sid       = "ReadObjects"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = each.value.read
  }

  dynamic "statement" {
    for_each = length(each.value.write) > 0 ? [1] : []
    content {
      sid = "WriteObjects"
      # Atomic writes put a temporary key, copy it into place and delete the temporary one.
      actions   = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
      resources = each.value.write
    }
  }

  statement {
    sid       = "UseBucketKey"
    actions   = length(each.value.write) > 0 ? ["kms:Decrypt", "kms:GenerateDataKey"] : ["kms:Decrypt"]
    resources = [aws_kms_key.bucket.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "component" {
  for_each = local.components

  name        = "asr-retune-${replace(each.key, "_", "-")}-s3"
  description = "asr-retune ${each.key}: its bucket prefixes only"
  policy      = data.aws_iam_policy_document.component[each.key].json
}

resource "aws_iam_role_policy_attachment" "component" {
  for_each = local.components

  role       = aws_iam_role.component[each.key].name
  policy_arn = aws_iam_policy.component[each.key].arn
}
