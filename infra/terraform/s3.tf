# The pipeline's bucket: runs and state (pipeline/), MLflow artifacts (mlflow-artifacts/),
# Airflow task logs (airflow-logs/). Private, versioned, KMS-encrypted, TLS only.

resource "aws_kms_key" "bucket" {
  description             = "asr-retune bucket encryption"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_key.json
}

resource "aws_kms_alias" "bucket" {
  name          = "alias/asr-retune-bucket"
  target_key_id = aws_kms_key.bucket.key_id
}

data "aws_caller_identity" "current" {}

data "aws_iam_policy_document" "kms_key" {
  # checkov:skip=CKV_AWS_109:A KMS key policy must give the account root administration of the key itself; "*" here means this key only.
  # checkov:skip=CKV_AWS_111:Same key-policy statement: the account root manages this key; access for the roles is granted by their own least-privilege policies.
  # checkov:skip=CKV_AWS_356:In a key policy the resource "*" is the key the policy is attached to, nothing else.
  statement {
    sid       = "AccountRootAdministersTheKey"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
}

resource "aws_s3_bucket" "pipeline" {
  bucket = var.bucket_name
  # checkov:skip=CKV_AWS_144:Single-region by design: the data is re-creatable from incoming drops and models are also in the MLflow registry; versioning plus the noncurrent-version window covers mistakes.
  # checkov:skip=CKV2_AWS_62:No consumer of bucket events exists; Airflow schedules the pipeline, not S3 notifications.
}

resource "aws_s3_bucket_public_access_block" "pipeline" {
  bucket                  = aws_s3_bucket.pipeline.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "pipeline" {
  bucket = aws_s3_bucket.pipeline.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "pipeline" {
  bucket = aws_s3_bucket.pipeline.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "pipeline" {
  bucket = aws_s3_bucket.pipeline.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.bucket.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_logging" "pipeline" {
  bucket        = aws_s3_bucket.pipeline.id
  target_bucket = aws_s3_bucket.access_logs.id
  target_prefix = "s3/${var.bucket_name}/"
}

resource "aws_s3_bucket_lifecycle_configuration" "pipeline" {
  bucket     = aws_s3_bucket.pipeline.id
  depends_on = [aws_s3_bucket_versioning.pipeline]

  rule {
    id     = "abort-incomplete-multipart"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  rule {
    id     = "noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_retention_days
    }
  }

  rule {
    id     = "runs-retention"
    status = "Enabled"
    filter {
      prefix = "${var.pipeline_prefix}/runs/"
    }
    transition {
      days          = 30
      storage_class = "STANDARD_IA"
    }
    expiration {
      days = var.run_retention_days
    }
  }

  rule {
    id     = "airflow-logs-retention"
    status = "Enabled"
    filter {
      prefix = "${var.airflow_logs_prefix}/"
    }
    expiration {
      days = 90
    }
  }
}

data "aws_iam_policy_document" "pipeline_bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.pipeline.arn,
      "${aws_s3_bucket.pipeline.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "pipeline" {
  bucket     = aws_s3_bucket.pipeline.id
  policy     = data.aws_iam_policy_document.pipeline_bucket.json
  depends_on = [aws_s3_bucket_public_access_block.pipeline]
}

# Server access logs of the pipeline bucket.
resource "aws_s3_bucket" "access_logs" {
  bucket = "${var.bucket_name}-access-logs"
  # checkov:skip=CKV_AWS_144:Access logs are operational data kept in the bucket's region only.
  # checkov:skip=CKV_AWS_145:S3 server access logging delivers only to SSE-S3 (AES256) encrypted targets, not SSE-KMS.
  # checkov:skip=CKV2_AWS_62:No consumer of log-bucket events.
}

resource "aws_s3_bucket_public_access_block" "access_logs" {
  bucket                  = aws_s3_bucket.access_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "access_logs" {
  bucket     = aws_s3_bucket.access_logs.id
  depends_on = [aws_s3_bucket_versioning.access_logs]

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = 365
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "access_logs_bucket" {
  statement {
    sid       = "S3ServerAccessLogsDelivery"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.access_logs.arn}/s3/*"]
    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = [aws_s3_bucket.pipeline.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.access_logs.arn,
      "${aws_s3_bucket.access_logs.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "access_logs" {
  bucket     = aws_s3_bucket.access_logs.id
  policy     = data.aws_iam_policy_document.access_logs_bucket.json
  depends_on = [aws_s3_bucket_public_access_block.access_logs]
}
