"""Container health check for the pipeline image (stdlib only).

RAY_NODE_TYPE=head    -> the GCS answers on the dashboard (8265) and the local raylet is healthy
RAY_NODE_TYPE=worker  -> the local raylet is healthy (dashboard agent, 52365)
otherwise             -> the package imports (one-off job containers)
"""

import os
import sys
import urllib.request


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - fixed localhost URL
            return resp.status == 200 and b"success" in resp.read()
    except OSError:
        return False


def main() -> int:
    node = os.environ.get("RAY_NODE_TYPE", "")
    agent = os.environ.get("RAY_DASHBOARD_AGENT_PORT", "52365")
    if node in ("head", "worker"):
        checks = [f"http://127.0.0.1:{agent}/api/local_raylet_healthz"]
        if node == "head":
            checks.append("http://127.0.0.1:8265/api/gcs_healthz")
        return 0 if all(_ok(u) for u in checks) else 1
    import pipeline  # noqa: F401  (fails the check if the install is broken)

    return 0


if __name__ == "__main__":
    sys.exit(main())
