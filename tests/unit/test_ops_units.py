"""The pure parts of the ops commands: peers files, work-dir host names, presence parsing, doctor verdicts."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time

import pytest

from node.cli.health import check as health_check
from node.cli.status import render
from node.config import NodeConfig
from node.join.peers_file import PeersFileError, read_peers_file, wait_for_peers_file
from node.ops.doctor import (
    FAIL,
    OK,
    WARN,
    check_device,
    check_disk,
    check_metrics_port,
    check_reachable,
    memory_estimate,
    model_parameters,
)
from node.ops.status import SwarmStatus, parse_presence
from node.workdir import WorkDirBusy, claim_work_dir, existing_work_dirs, is_locked, pid_namespace

BOOT = "/ip4/172.20.0.2/tcp/31337/p2p/12D3KooWBootstrap"
LOOP = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWBootstrap"


def test_peers_file_from_a_running_nodes_status(tmp_path):
    path = tmp_path / "node.json"
    assert read_peers_file(path) is None  # not written yet
    path.write_text(json.dumps({"status": "joining", "maddrs": [BOOT]}))
    assert read_peers_file(path) is None  # not serving yet
    path.write_text(json.dumps({"status": "running", "maddrs": [LOOP, BOOT]}))
    assert read_peers_file(path) == [BOOT]  # another container's loopback is not the bootstrap
    path.write_text(json.dumps({"status": "running", "maddrs": [LOOP]}))
    assert read_peers_file(path) == [LOOP]  # one host: loopback is all there is
    path.write_text('{"status": "runn')
    assert read_peers_file(path) is None  # partial copy


def test_peers_file_as_plain_multiaddr_lines(tmp_path):
    path = tmp_path / "peers.txt"
    path.write_text(f"# the bootstrap nodes\n{BOOT}\n\n  /dns4/boot.example.org/tcp/31337/p2p/12D3KooWX  \n")
    assert read_peers_file(path) == [BOOT, "/dns4/boot.example.org/tcp/31337/p2p/12D3KooWX"]


def test_waiting_for_a_peers_file_is_bounded(tmp_path):
    started = time.monotonic()
    with pytest.raises(PeersFileError, match="no running peer"):
        asyncio.run(wait_for_peers_file(tmp_path / "never.json", timeout=0.3, interval=0.05))
    assert time.monotonic() - started < 5

    async def appears_later():
        path = tmp_path / "later.txt"
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, path.write_text, BOOT + "\n")
        return await wait_for_peers_file(path, timeout=10, interval=0.05)

    assert asyncio.run(appears_later()) == [BOOT]


def test_a_work_dir_is_held_by_one_node_and_slots_go_to_the_lowest_free_number(tmp_path):
    alone, fd = claim_work_dir(str(tmp_path / "node"))
    try:
        assert alone == tmp_path / "node" and is_locked(alone)
        with pytest.raises(WorkDirBusy, match="in use by another running node"):
            claim_work_dir(str(tmp_path / "node"))  # flock: a second open file conflicts even in one process
    finally:
        os.close(fd)
    assert not is_locked(alone)  # released with the fd (or the process)
    template = str(tmp_path / "data" / "node-{slot}")
    first, fd1 = claim_work_dir(template)
    second, fd2 = claim_work_dir(template)
    assert (first.name, second.name) == ("node-1", "node-2")
    os.close(fd1)  # slot 1's node leaves: the next node (a re-created container) gets slot 1 back
    again, fd3 = claim_work_dir(template)
    assert again.name == "node-1" and existing_work_dirs(template) == [first, second]
    for fd in (fd2, fd3):
        os.close(fd)


def test_health_of_a_slot_work_dir_finds_this_hosts_node(tmp_path):
    template = str(tmp_path / "node-{slot}")
    assert health_check(template) == (False, f"no node of this host holds a work dir matching {template}")
    directory, fd = claim_work_dir(template)
    try:
        (directory / "node.json").write_text(json.dumps({
            "status": "running", "pid": os.getpid(), "metrics_port": None, "round": 3,
            "hostname": socket.gethostname(), "pid_namespace": pid_namespace()}))
        healthy, detail = health_check(template)
        assert healthy and "round 3" in detail
        (directory / "node.json").write_text(json.dumps({"status": "running", "pid": os.getpid(),
                                                         "hostname": "another-container"}))
        assert not health_check(template)[0]  # another container's node on the shared volume
        (directory / "node.json").write_text(json.dumps({"status": "running", "pid": os.getpid(),
                                                         "hostname": socket.gethostname(), "pid_namespace": -1}))
        assert not health_check(template)[0]  # same host name (network_mode: host), another container
    finally:
        os.close(fd)


def test_presence_parsing_survives_missing_and_hostile_fields():
    now = time.time()
    good = parse_presence("A", {
        "round": 7, "manifest": "m", "eval_loss": 2.5, "train_loss": 2.6, "tokens_per_second": 1000.0, "time": now - 1,
        "last_exchange": {"time": now - 4, "partner": "B"}, "exchanges": {"ok": 3, "timeout": 1},
        "flagged": ["C"], "version": "0.1.0", "maddrs": ["/ip4/1.2.3.4/tcp/1"]}, now)
    assert (good.round, good.eval_loss, good.last_exchange_partner, good.flagged) == (7, 2.5, "B", ["C"])
    assert good.clock_offset == pytest.approx(-1, abs=0.01) and good.last_exchange_age == pytest.approx(4, abs=0.01)
    hostile = parse_presence("X", {"round": "7", "eval_loss": [1], "exchanges": {"ok": "many", 3: 1},
                                   "flagged": "everyone", "last_exchange": 5, "time": True}, now)
    assert hostile.round is None and hostile.eval_loss is None and hostile.exchanges == {}
    assert hostile.flagged == [] and hostile.last_exchange_partner is None and hostile.clock_offset is None
    assert math.isnan(hostile.age_seconds)


def test_status_aggregates_flags_and_renders_them():
    now = time.time()
    peers = [parse_presence(p, {"round": 3, "manifest": "m", "flagged": flagged, "time": now}, now)
             for p, flagged in (("A", ["C"]), ("B", ["C"]), ("C", []))]
    swarm = SwarmStatus("run", "m", peers, [], ["D"], now)
    assert swarm.flagged == {"C": ["A", "B"]}
    text = render(swarm)
    assert "live peers 3" in text and "C  flagged by 2" in text and "recently left" in text
    assert json.loads(json.dumps(swarm.to_json()))["flagged"] == {"C": ["A", "B"]}
    nan = SwarmStatus("run", "m", [parse_presence("A", {"eval_loss": math.nan, "time": now}, now)], [], [], now)
    assert json.loads(json.dumps(nan.to_json(), allow_nan=False))["peers"][0]["eval_loss"] == "nan"


def test_doctor_memory_estimate_grows_with_the_model_and_verification():
    small = NodeConfig()
    parameters = model_parameters(small)
    assert parameters == 470_528  # the built-in default model, counted without allocating it
    assert memory_estimate(small, parameters) > 21 * 4 * parameters  # verification keeps round starts
    assert memory_estimate(NodeConfig(verify="off"), parameters) < memory_estimate(small, parameters)
    big = NodeConfig(d_model=2048, n_layers=24, n_heads=16, context=1024)
    assert model_parameters(big) > 1_000_000_000


def test_doctor_verdicts_name_a_fix(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        check = check_metrics_port(NodeConfig(metrics_port=port))
    assert check.verdict == FAIL and "--metrics-port" in check.fix
    assert check_metrics_port(NodeConfig(metrics_port=-1)).verdict == "skip"
    import torch
    if not torch.cuda.is_available():
        cuda = check_device(NodeConfig(device="cuda"), 1000)
        assert cuda.verdict == FAIL and "torch" in cuda.fix
        huge = check_device(NodeConfig(device="cpu"), 10**12)  # ~4 TB of tensors
        assert huge.verdict == FAIL
    assert check_disk(NodeConfig(work_dir=str(tmp_path / "new" / "dir")), 1000).verdict in (OK, WARN)
    assert not (tmp_path / "new").exists(), "doctor does not create the work dir"
    (tmp_path / "a-file").write_text("")  # unwritable for root too: a file where a directory should be
    disk = check_disk(NodeConfig(work_dir=str(tmp_path / "a-file" / "node")), 1000)
    assert disk.verdict == FAIL and "--work-dir" in disk.fix


def test_doctor_gpu_verdicts_compare_the_model_with_free_vram(monkeypatch):
    """The CUDA branch's decisions, with the device queries answered by the test (CI has no GPU; the
    queries themselves are torch's)."""
    import torch

    gib = 2**30
    free = {"bytes": 10 * gib}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Test GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (free["bytes"], 80 * gib))
    cfg = NodeConfig(device="auto")
    parameters = 100_000_000  # ~100M: about 10 GB of tensors with verification on
    need = memory_estimate(cfg, parameters)
    free["bytes"] = 2 * need
    assert check_device(cfg, parameters).verdict == OK
    free["bytes"] = int(need / 0.9)
    assert check_device(cfg, parameters).verdict == WARN  # under 20% headroom
    free["bytes"] = need // 2
    short = check_device(cfg, parameters)
    assert short.verdict == FAIL and "micro-batches" in short.fix and "Test GPU" in short.detail
    assert check_device(NodeConfig(device="cuda:3"), parameters).verdict == FAIL  # no such device
    free["bytes"] = need // 2
    assert check_device(NodeConfig(device="cpu"), 1000).verdict == OK  # --device cpu ignores the GPU


def test_doctor_reachability_from_addresses(monkeypatch):
    import ipaddress

    import node.ops.doctor as doctor

    remote = "/ip4/8.8.4.4/tcp/31337/p2p/12D3KooWX"
    assert check_reachable(NodeConfig()).verdict == "skip"
    assert doctor._source_ip(ipaddress.ip_address("127.0.0.1")) == ipaddress.ip_address("127.0.0.1")  # no packet sent
    assert check_reachable(NodeConfig(initial_peers=[LOOP])).verdict == OK  # a swarm on this machine
    loopback = check_reachable(NodeConfig(initial_peers=[remote]))  # the default host is 127.0.0.1
    assert loopback.verdict == FAIL and "--host 0.0.0.0" in loopback.fix
    assert check_reachable(NodeConfig(initial_peers=[remote], host="0.0.0.0",
                                      announce=["/ip4/127.0.0.1/tcp/31337"])).verdict == FAIL
    assert check_reachable(NodeConfig(initial_peers=[remote], host="0.0.0.0",
                                      announce=["/ip4/8.8.8.8/tcp/31337"])).verdict == OK
    monkeypatch.setattr(doctor, "_source_ip", lambda destination: ipaddress.ip_address("192.168.1.5"))
    natted = check_reachable(NodeConfig(initial_peers=[remote], host="0.0.0.0"))
    assert natted.verdict == WARN and "192.168.1.5" in natted.detail and "cannot be forwarded" in natted.fix
    monkeypatch.setattr(doctor, "_source_ip", lambda destination: ipaddress.ip_address("8.8.8.8"))
    assert check_reachable(NodeConfig(initial_peers=[remote], host="0.0.0.0", port=31337)).verdict == OK
