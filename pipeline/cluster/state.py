"""The local cluster's record and environment.

``cluster.json`` under the spec's state dir holds the address, the dashboard, the auth mode and each
node's pid, log and temp dir, so that ``status``, ``down``, a node kill and a driver in another
process all find the same cluster. Ray 2.60 turns token authentication on for a new local cluster; the
nodes and every client of this cluster use the same mode, and the token of ``~/.ray/auth_token``
(or ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``), made once by ``ray get-auth-token --generate``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.cluster.plan import (
    ClusterError,
    ClusterNotUp,
    ClusterSpec,
    ray_executable,
)

STATE_VERSION = 1
AUTH_ENV = "RAY_AUTH_MODE"
# what every node of the local cluster runs with (an explicit environment variable wins)
NODE_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",  # as pipeline.ray.ensure_ray sets it for the driver
    "RAY_DEDUP_LOGS": "1",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",  # `down` drains each node for at most this long
    "RAY_health_check_period_ms": "1000",  # the GCS marks a killed node dead within ~3 s
    "RAY_health_check_failure_threshold": "3",
}


def read_state(spec: ClusterSpec) -> dict[str, Any] | None:
    """The recorded cluster, or None when none was started from ``spec.state_dir``."""
    try:
        state = json.loads(spec.state_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot read the cluster record {spec.state_file}: {exc}; "
                           "remove it if no cluster runs") from exc
    if state.get("version") != STATE_VERSION:
        raise ClusterError(f"{spec.state_file} has record version {state.get('version')}, not {STATE_VERSION}: "
                           "stop that cluster with the version that started it, or remove the file")
    return state


def require_state(spec: ClusterSpec) -> dict[str, Any]:
    state = read_state(spec)
    if state is None:
        raise ClusterNotUp(f"no local Ray cluster is up (no record at {spec.state_file}): run `asr-retune cluster up`")
    return state


def write_state(spec: ClusterSpec, state: dict[str, Any]) -> None:
    """Record ``state`` (written whole, then renamed: a reader never sees half a file)."""
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = spec.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(spec.state_file)


def clear_state(spec: ClusterSpec) -> None:
    spec.state_file.unlink(missing_ok=True)


def new_state(spec: ClusterSpec, auth_mode: str) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "address": spec.address,
        "dashboard_url": spec.dashboard_url,
        "auth_mode": auth_mode,
        "spot_resource": spec.spot_resource,
        "temp_dir": str(spec.temp_dir),
        "nodes": {},
    }


def auth_mode() -> str:
    """The auth mode a new cluster gets: ``RAY_AUTH_MODE`` when set, else Ray's default, ``token``."""
    return os.environ.get(AUTH_ENV, "token").lower()


def ensure_token(mode: str) -> None:
    """Make the token of token auth if this machine has none yet (``ray get-auth-token --generate``)."""
    if mode != "token" or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    result = subprocess.run([ray_executable(), "get-auth-token", "--generate"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=60)
    if result.returncode != 0:
        raise ClusterError(f"could not make Ray's auth token (`ray get-auth-token --generate`): {result.stderr[-500:]}")


def node_env(mode: str, address: str) -> dict[str, str]:
    """The environment of a node's ``ray start``. ``RAY_ADDRESS`` is this cluster's: a process on the node
    that asks Ray for "the" local cluster (the state API with no address, as Ray Train's placement-group
    cleaner does) must find this one, not whichever other Ray runs on the machine."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    for name, value in NODE_ENV_DEFAULTS.items():
        env.setdefault(name, value)
    env.update({AUTH_ENV: mode, "RAY_ADDRESS": address})
    return env


def use_auth(mode: str) -> None:
    """Make this process talk to a cluster whose auth mode is ``mode`` (Ray reads it from the environment,
    and caches it: reload Ray's config when it changes)."""
    if os.environ.get(AUTH_ENV, "").lower() == mode:
        return
    os.environ[AUTH_ENV] = mode
    from ray._raylet import Config

    Config.initialize("")
