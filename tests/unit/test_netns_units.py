"""node/tools/netns.py without root: names, addresses, rates, stale detection, cgroup discovery, command prefixes;
the LocalSwarm host hook; the wan bench's pure parts."""

from __future__ import annotations

import ipaddress
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from node.bench import wan
from node.tools import netns
from node.tools.swarm import LocalSwarm, NodeHost


def test_rates_are_read_like_tc_reads_them():
    assert netns.rate_bits("20mbit") == 20e6
    assert netns.rate_bits("512kbit") == 512e3
    assert netns.rate_bits("2.5mbps") == 20e6
    assert netns.rate_bits(" 1Gbit ") == 1e9
    for bad in ("20", "20 mbit", "-1mbit", "0mbit", "fast", "20mb"):
        with pytest.raises(ValueError):
            netns.rate_bits(bad)
    assert netns.tbf_args("20mbit") == ["tbf", "rate", "20mbit", "burst", "256kb", "latency", "400ms"]
    with pytest.raises(ValueError):
        netns.tbf_args("lots")


def test_names_fit_interface_limits_and_are_recognised_by_prefix():
    names = netns.Names("gt", "0a1b2c")
    assert names.bridge == "gt0a1b2c-br"
    assert names.netns(3) == "gt0a1b2c-h3" and names.veth(3) == "gt0a1b2c-v3" and names.cgroup(3) == names.netns(3)
    last = netns.max_hosts("gt") - 1
    assert len(names.veth(last)) <= netns.IFNAMSIZ
    with pytest.raises(ValueError):
        netns.Names("toolong", "0a1b2c")
    with pytest.raises(ValueError):
        netns.Names("gt", "xyz")
    with pytest.raises(ValueError):
        netns.Names("abcde", "0a1b2c").veth(1000)
    pattern = netns.Names.pattern("gt")
    assert pattern.match("gt0a1b2c-v12").groups() == ("0a1b2c", "v12")
    assert not pattern.match("gtx0a1b2c-br") and not pattern.match("eth0") and not pattern.match("gt0a1b2c-br2")
    assert netns.Names.random().tag != netns.Names.random().tag


def test_a_subnet_is_picked_free_of_the_networks_in_use():
    used = [ipaddress.IPv4Network(n) for n in ("10.213.0.0/24", "10.213.1.128/25", "0.0.0.0/0", "192.0.2.0/24")]
    rng = random.Random(1)
    for _ in range(50):
        subnet = netns.pick_subnet("10.213.0.0/22", used, rng)
        assert subnet in (ipaddress.IPv4Network("10.213.2.0/24"), ipaddress.IPv4Network("10.213.3.0/24"))
    with pytest.raises(netns.NetnsError):
        netns.pick_subnet("10.213.0.0/24", [ipaddress.IPv4Network("10.0.0.0/8")])
    with pytest.raises(ValueError):
        netns.pick_subnet("10.213.0.0/25", [])


def test_addresses_bridge_first_then_hosts():
    addressing = netns.Addressing(ipaddress.IPv4Network("10.213.7.0/24"))
    assert addressing.bridge == "10.213.7.1" and addressing.prefixlen == 24
    assert [addressing.host(i) for i in range(3)] == ["10.213.7.2", "10.213.7.3", "10.213.7.4"]
    assert addressing.host(252) == "10.213.7.254"
    with pytest.raises(ValueError):
        addressing.host(253)


def test_owner_marks_round_trip_and_stale_networks_are_found():
    assert netns.parse_owner(netns.format_owner(123, 456)) == (123, 456)
    assert netns.parse_owner(None) is None and netns.parse_owner("someone else's bridge") is None
    alive = {(1, 10)}
    bridges = {
        "gtaaaaaa-br": netns.format_owner(1, 10),  # live owner
        "gtbbbbbb-br": netns.format_owner(2, 20),  # owner gone
        "gtcccccc-br": None,  # no mark: not made by a Network (or half made): stale
        "xxdddddd-br": netns.format_owner(2, 20),  # another prefix: not ours to judge
        "eth0": None,
    }
    others = ["gtaaaaaa-h0", "gtaaaaaa-v0", "gtbbbbbb-h1", "gteeeeee-h0", "gteeeeee-v3", "xxffffff-h0", "gt-notours"]
    stale = netns.stale_tags("gt", bridges, others, lambda pid, start: (pid, start) in alive)
    assert stale == {"bbbbbb", "cccccc", "eeeeee"}


def test_host_prefix_joins_the_cgroup_then_the_namespace_then_the_core():
    assert netns.host_prefix("ns0") == ["ip", "netns", "exec", "ns0"]
    assert netns.host_prefix("ns0", core=1) == ["ip", "netns", "exec", "ns0", "taskset", "-c", "1"]
    prefix = netns.host_prefix("ns0", "/cg/x/cgroup.procs", 0)
    assert prefix == ["sh", "-c", netns.JOIN_CGROUP, "sh", "/cg/x/cgroup.procs", "ip", "netns", "exec", "ns0",
                      "taskset", "-c", "0"]
    host = netns.Host(0, "ns0", "v0", "10.0.0.2", netns.CpuShare(core=1, quota=0.5), Path("/cg/h0"))
    assert host.prefix == netns.host_prefix("ns0", "/cg/h0/cgroup.procs", 1)


def test_the_cgroup_join_writes_the_pid_of_the_command_itself(tmp_path):
    procs = tmp_path / "cgroup.procs"
    done = subprocess.run(["sh", "-c", netns.JOIN_CGROUP, "sh", str(procs), sys.executable, "-c",
                           "import os; print(os.getpid())"], capture_output=True, text=True, timeout=30, check=True)
    assert procs.read_text().strip() == done.stdout.strip()  # exec: the shell's pid became the command's


def test_cpu_shares_and_cgroup_limits():
    assert netns.CpuShare(quota=0.5).quota_us() == 50_000
    assert netns.CpuShare(core=1).quota_us() is None
    for bad in ({"core": -1}, {"quota": 0}, {"quota": 5000}):
        with pytest.raises(ValueError):
            netns.CpuShare(**bad)
    assert netns.CpuCgroups(1, Path("/x")).limit_files(30_000) == {"cpu.cfs_period_us": "100000",
                                                                    "cpu.cfs_quota_us": "30000"}
    assert netns.CpuCgroups(2, Path("/x")).limit_files(30_000) == {"cpu.max": "30000 100000"}


MOUNTS_V1 = """tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
"""
MOUNTS_V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n"


def test_the_cpu_controller_is_found_in_v1_or_v2():
    found = netns.find_cpu_cgroups(MOUNTS_V1, "4:cpu,cpuacct:/ci/job\n3:cpuset:/\n0::/\n", lambda p: "")
    assert found == netns.CpuCgroups(1, Path("/sys/fs/cgroup/cpu,cpuacct/ci/job"))
    found = netns.find_cpu_cgroups(MOUNTS_V2, "0::/user.slice\n", lambda p: "cpuset cpu io memory pids")
    assert found == netns.CpuCgroups(2, Path("/sys/fs/cgroup/user.slice"))
    assert netns.find_cpu_cgroups(MOUNTS_V2, "0::/\n", lambda p: "memory pids") is None
    assert netns.find_cpu_cgroups("", "", lambda p: "") is None


def test_unavailable_reasons_say_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in netns.unavailable_reason()
    with pytest.raises(netns.NetnsUnavailable) as caught:
        netns.require()
    assert "root" in caught.value.reason
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else f"/usr/sbin/{tool}")
    assert netns.unavailable_reason() == "emulated networks need tc (iproute2) on PATH"


def test_a_network_checks_its_arguments_before_touching_anything():
    with pytest.raises(ValueError):
        netns.Network(0)
    with pytest.raises(ValueError):
        netns.Network(2, rate="quick")
    with pytest.raises(ValueError):
        netns.Network(2, cpu=[netns.CpuShare(core=0)])
    network = netns.Network(2)
    network.close()  # never started: nothing to do, twice
    network.close()
    with pytest.raises(netns.NetnsError):
        network.host(0)


def test_swarm_default_command_is_unchanged_and_a_host_adds_prefix_and_addresses(tmp_path):
    plain = LocalSwarm(2, tmp_path, ["--x"]).command(1, ["/ip4/127.0.0.1/tcp/1/p2p/A"])
    assert plain[:4] == [sys.executable, "-m", "node", "run"] and "--host" not in plain and "--metrics-host" not in plain
    hosts = [NodeHost("10.213.7.2", ("ip", "netns", "exec", "ns0")), NodeHost("10.213.7.3", ("ip", "netns", "exec", "ns1"))]
    swarm = LocalSwarm(2, tmp_path, ["--x"], hosts=hosts)
    cmd = swarm.command(1, ["/ip4/10.213.7.2/tcp/1/p2p/A"])
    assert cmd[:5] == ["ip", "netns", "exec", "ns1", sys.executable]
    assert cmd[cmd.index("--host") + 1] == "10.213.7.3" and cmd[cmd.index("--metrics-host") + 1] == "10.213.7.3"
    assert cmd[-1] == "--x"  # node args last: they may override
    with pytest.raises(ValueError):
        LocalSwarm(3, tmp_path, hosts=hosts)


def test_wan_rows_parse_labels_and_flags():
    assert wan.Row.parse("current:") == wan.Row("current")
    assert wan.Row.parse("overlap: --overlap on --sync-timeout '30'") == wan.Row("overlap", ("--overlap", "on",
                                                                                              "--sync-timeout", "30"))
    assert wan.Row.parse("plain") == wan.Row("plain")
    for bad in (": --x", "a b: --x"):
        with pytest.raises(ValueError):
            wan.Row.parse(bad)


def test_wan_parameter_count_matches_the_model():
    from node.train.model import ModelConfig, build_model, count_parameters

    for d_model, n_layers, context in ((64, 2, 64), (96, 3, 32)):
        model = build_model(ModelConfig(context=context, d_model=d_model, n_layers=n_layers, n_heads=4), 0)
        assert wan.parameter_count(d_model, n_layers, context) == count_parameters(model)
    assert wan.parameter_count(512, 6, 64) == 19_210_240  # the "19M" model of the WAN baseline


def test_wan_figures_from_a_scrape():
    start = wan.Window(wall=100.0, tokens=1000.0, compute=10.0)
    samples = {
        'gossiptrain_outer_rounds_total{mode="paired"}': 3, 'gossiptrain_outer_rounds_total{mode="local"}': 1,
        'gossiptrain_exchanges_total{result="ok"}': 3, 'gossiptrain_exchanges_total{result="timeout"}': 1,
        'gossiptrain_exchanges_total{result="no_partner"}': 1, 'gossiptrain_bytes_sent_total{kind="exchange"}': 8e6,
        "gossiptrain_tokens_total": 3000.0, "gossiptrain_train_compute_seconds_total": 15.0,
        "gossiptrain_eval_loss": 2.5,
    }
    row = wan.node_figures(0, samples, start, end_wall=110.0)
    assert row["paired %"] == 75.0 and row["rounds"] == 4 and row["ex ok"] == 3 and row["timeout"] == 1
    assert row["alone"] == 1 and row["MB/ex"] == 2.0 and row["tok/s"] == 200.0 and row["util"] == 0.5
    assert row["eval"] == 2.5
    empty = wan.node_figures(1, {}, None, end_wall=110.0)
    assert math.isnan(empty["paired %"]) and math.isnan(empty["util"]) and empty["ex ok"] == 0
