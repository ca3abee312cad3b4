"""Copy a model archive (s3://... or file://...) into the model store; print its path.

Credentials come from the environment (IRSA web identity on Kubernetes, env file in
compose) through boto3's default chain; they are never printed. When ASR_MODEL_SHA256 is
set the archive's checksum must match, or the container exits non-zero before serving.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse


def fetch(uri: str, store: Path) -> Path:
    parsed = urlparse(uri)
    name = Path(parsed.path).name
    if not name.endswith(".mar"):
        raise SystemExit(f"ASR_MODEL_URI must name a .mar archive, got {uri!r}")
    dest = store / name
    tmp = store / f".{name}.part"
    if parsed.scheme == "s3":
        import boto3

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or None
        boto3.client("s3", endpoint_url=endpoint).download_file(parsed.netloc, parsed.path.lstrip("/"), str(tmp))
    elif parsed.scheme in ("file", ""):
        shutil.copyfile(parsed.path, tmp)
    else:
        raise SystemExit(f"unsupported ASR_MODEL_URI scheme {parsed.scheme!r} (use s3:// or file://)")
    expected = os.environ.get("ASR_MODEL_SHA256", "").strip().lower()
    if expected:
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if digest != expected:
            tmp.unlink(missing_ok=True)
            raise SystemExit(f"checksum mismatch for {uri}: expected {expected}, got {digest}")
    tmp.replace(dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: fetch_model.py URI MODEL_STORE")
    print(fetch(sys.argv[1], Path(sys.argv[2])))
