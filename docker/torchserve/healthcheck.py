"""TorchServe health check (stdlib only): GET /ping on the inference port.

With token authorization on, /ping needs the inference key: it is read from key_file.json
in TorchServe's working directory. With it off (Kubernetes, where the mesh authenticates),
no key file exists and the ping goes without a header.
"""

import json
import os
import sys
import urllib.request
from pathlib import Path


def main() -> int:
    workdir = Path(os.environ.get("ASR_TS_WORKDIR", "/home/model-server/run"))
    req = urllib.request.Request("http://127.0.0.1:8080/ping")
    key_file = workdir / "key_file.json"
    if key_file.exists():
        key = json.loads(key_file.read_text())["inference"]["key"]
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=4) as resp:  # noqa: S310 - fixed localhost URL
            return 0 if resp.status == 200 and b"Healthy" in resp.read() else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
