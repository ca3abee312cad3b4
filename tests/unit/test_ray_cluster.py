"""The local cluster's plan (ports, resources, each ``ray start``) and its process handling, without Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipeline.cluster import HEAD, ClusterError, ClusterSpec, cluster_spec
from pipeline.cluster.node import busy_ports, kill_processes, node_processes, process_of
from pipeline.config import Config


def _spec(**kw) -> ClusterSpec:
    return ClusterSpec(**{"port": 21000, "dashboard_port": 21990, "temp_dir": Path("/tmp/rc-test"), **kw})


def _flag(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_every_port_of_every_node_is_distinct():
    spec = _spec(workers=3, dashboard_port=22990)  # 3 workers: two blocks of 500 ports (first starts, restarts)
    ports = [p for p, what in spec.all_ports() if what != "head dashboard"]
    assert len(ports) == len(set(ports)) == len(spec.all_ports()) - 1
    assert min(ports) == spec.port and max(ports) == spec.port + spec.last_port_offset()
    assert spec.node_ports(HEAD)["dashboard"] == 22990


def test_head_runs_the_driver_with_no_cpus_and_the_dashboard_on_loopback():
    cmd = _spec().start_command(HEAD)
    assert cmd[1:3] == ["start", "--block"] and "--head" in cmd
    assert _flag(cmd, "--num-cpus") == "0" and json.loads(_flag(cmd, "--resources")) == {}
    assert _flag(cmd, "--dashboard-host") == "127.0.0.1" and _flag(cmd, "--dashboard-port") == "21990"
    assert _flag(cmd, "--node-ip-address") == "127.0.0.1"


def test_worker_nodes_carry_the_spot_resource_and_join_the_head():
    spec = _spec(cpus_per_worker=2, spot_resource="preemptible")
    cmd = spec.start_command("worker-1", generation=3)
    assert _flag(cmd, "--address") == "127.0.0.1:21000" and "--head" not in cmd
    assert _flag(cmd, "--num-cpus") == "2"
    assert json.loads(_flag(cmd, "--resources")) == {"preemptible": 2.0}
    assert _flag(cmd, "--labels") == "asr-retune/node=worker-1"
    assert _flag(cmd, "--temp-dir") == "/tmp/rc-test/w1.3"  # a restart gets a fresh temp dir
    assert int(_flag(cmd, "--min-worker-port")) == spec.node_ports("worker-1", 3)["min_worker"]


def test_a_restarted_worker_node_alternates_between_two_port_blocks_and_the_head_never_moves():
    spec = _spec(workers=2)
    first, second, third = (spec.node_ports("worker-0", g) for g in (0, 1, 2))
    assert first == third and not set(first.values()) & set(second.values())
    assert second["node_manager"] - first["node_manager"] == spec.port_block() == 400
    assert spec.node_ports(HEAD, 1) == spec.node_ports(HEAD, 0)
    cmd = spec.start_command("worker-0", generation=1)
    assert int(_flag(cmd, "--node-manager-port")) == second["node_manager"]
    assert int(_flag(cmd, "--max-worker-port")) == second["max_worker"]
    listed = {p for p, _ in spec.all_ports()}  # `cluster up` checks the restart block is free too
    assert set(second.values()) - {second["max_worker"]} <= listed and second["max_worker"] in listed


def test_no_spot_resource_gives_workers_no_custom_resource():
    assert json.loads(_flag(_spec(spot_resource=None).start_command("worker-0"), "--resources")) == {}


def test_cluster_spec_reads_the_config_with_defaults_and_overrides(tmp_path):
    spec = cluster_spec(Config(), state_dir=tmp_path, port=22000)
    assert (spec.workers, spec.head_cpus, spec.spot_resource, spec.dashboard_port) == (2, 0, "spot", 8265)
    assert spec.cpus_per_worker >= 1 and spec.state_file == tmp_path / "cluster.json"
    assert spec.temp_dir.name == "asr-ray-22000"  # follows the port: two clusters never share it


@pytest.mark.parametrize("kw, message", [
    ({"temp_dir": Path("/tmp/" + "x" * 60)}, "too long for its sockets"),
    ({"port": 65300}, "out of range"),
    ({"workers": 0}, "at least one worker"),
    ({"object_store_mb": 10}, "below Ray's minimum"),
    ({"dashboard_port": 21050}, "dashboard port 21050 is among"),
])
def test_bad_specs_say_what_is_wrong(kw, message):
    with pytest.raises(ClusterError, match=message):
        _spec(**kw)


def test_busy_ports_finds_a_listener():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert busy_ports([(port, "x"), (port + 1 if port < 65535 else port - 1, "y")])[:1] == [(port, "x")]


def test_node_processes_match_paths_under_the_temp_dir_only_and_spare_this_process(tmp_path):
    node_dir = tmp_path / "t"
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{node_dir}2/x"])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{node_dir}/sockets/raylet"])
    try:
        found = {p.pid for p in node_processes(None, None, node_dir)}
        assert child.pid in found and sibling.pid not in found  # /t2 is not under /t
        leader = node_processes(child.pid, None, tmp_path / "elsewhere")
        assert [p.pid for p in leader] == [child.pid]
        assert kill_processes(leader) == [child.pid]
        assert process_of(child.pid, None) is None and not psutil.pid_exists(child.pid)  # killed and reaped
    finally:
        for proc in (sibling, child):
            proc.kill()
            proc.wait()
