"""Preflight checks for a node (`gossiptrain doctor`): one verdict and, where it is not ok, one fix per check.

Every check is bounded in time and never changes the machine, except that the p2pd check
starts and stops one daemon and the swarm checks join the DHT as a client for a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import ipaddress
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import NodeConfig
from node.workdir import candidates, is_locked

if TYPE_CHECKING:
    from node.ops.status import SwarmStatus

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
P2PD_TIMEOUT = 30.0
MAX_CLOCK_SKEW = 3.0  # hivemind's DHT refuses to bootstrap against a peer whose clock differs by more
MAX_CLOCK_PEERS = 16  # peers whose clocks are measured
WARN_CLOCK_SKEW = 1.0
REQUIRED_PYTHON = (3, 11)
HIVEMIND_VERSION = "1.1.12"
MIN_TORCH = (2, 1)
FLOAT_BYTES = 4
MEMORY_SLACK = 1.2  # allocator fragmentation, temporaries, what the plan does not name


@dataclass
class Check:
    name: str
    verdict: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] >= REQUIRED_PYTHON:
        return Check("python", OK, f"Python {version} ({sys.executable})")
    return Check("python", FAIL, f"Python {version} is too old",
                 f"install Python {'.'.join(map(str, REQUIRED_PYTHON))} or newer and reinstall gossiptrain in it")


def check_packages() -> Check:
    found, missing = {}, []
    for name in ("torch", "hivemind", "uvloop", "msgpack", "prometheus-client", "cryptography", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    detail = ", ".join(f"{k} {v}" for k, v in found.items())
    if missing:
        return Check("packages", FAIL, f"missing: {', '.join(missing)}; found {detail}",
                     "pip install -e . (or pip install gossiptrain) in this environment")
    if _version_tuple(found["torch"]) < MIN_TORCH:
        return Check("packages", FAIL, f"torch {found['torch']} is older than {'.'.join(map(str, MIN_TORCH))}; {detail}",
                     "pip install --upgrade torch (CPU: --index-url https://download.pytorch.org/whl/cpu)")
    if found["hivemind"] != HIVEMIND_VERSION:
        return Check("packages", WARN, f"hivemind {found['hivemind']} (tested with {HIVEMIND_VERSION}); {detail}",
                     f"pip install hivemind=={HIVEMIND_VERSION}")
    return Check("packages", OK, detail)


async def check_p2pd() -> Check:
    from node.net.p2pd import start_p2p

    started = time.monotonic()
    p2p = None
    try:
        p2p = await start_p2p(P2PD_TIMEOUT, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        seconds = time.monotonic() - started
        return Check("p2pd", OK, f"the bundled libp2p daemon started in {seconds:.2f}s as {p2p.peer_id.to_base58()[-8:]}")
    except TimeoutError:
        return Check("p2pd", FAIL, f"p2pd did not start within {P2PD_TIMEOUT:.0f}s",
                     "check CPU load and that /tmp is writable (p2pd listens on a unix socket there)")
    except Exception as error:  # noqa: BLE001 - missing binary, wrong platform, permissions
        return Check("p2pd", FAIL, f"p2pd failed to start: {error}",
                     f"reinstall hivemind (pip install --force-reinstall hivemind=={HIVEMIND_VERSION}: its wheel "
                     "bundles p2pd for linux/macOS x86_64 and arm64)")
    finally:
        if p2p is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p2p.shutdown(), 10)


def _port_free(host: str, port: int) -> str | None:
    """None if host:port can be bound for TCP now, else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def check_listen_port(cfg: NodeConfig) -> Check:
    if cfg.port == 0:
        return Check("listen port", OK, f"{cfg.host}: a random free port is taken at each start")
    problem = _port_free(cfg.host, cfg.port)
    if problem:
        return Check("listen port", FAIL, f"cannot listen on {cfg.host}:{cfg.port}: {problem}",
                     f"stop what uses port {cfg.port} (ss -ltnp 'sport = :{cfg.port}') or pick another --port")
    return Check("listen port", OK, f"{cfg.host}:{cfg.port} is free")


def _maddr_ip(maddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    parts = maddr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(parts[2])
        except ValueError:
            return None
    return None


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _source_ip(destination: IPAddress) -> IPAddress | None:
    """The local address this machine would use to reach `destination` (a UDP connect sends no packet)."""
    family = socket.AF_INET6 if destination.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((str(destination), 9))
            return ipaddress.ip_address(sock.getsockname()[0])
    except OSError:
        return None


def check_reachable(cfg: NodeConfig) -> Check:
    """Can peers open connections to this node? Judged from addresses alone (no packet is sent): a loopback
    listener or an unannounced address behind NAT cannot be reached; a firewall can still block a good one."""
    peer_ips = [ip for ip in map(_maddr_ip, cfg.initial_peers) if ip is not None]
    if not cfg.initial_peers:
        return Check("reachable", SKIP, "no --initial-peer: peers will dial the addresses this node prints at start")
    remote = [ip for ip in peer_ips if not ip.is_loopback]
    if not remote and len(peer_ips) == len(cfg.initial_peers):
        return Check("reachable", OK, "a swarm on this machine (loopback addresses)")
    loopback_host = cfg.host in ("127.0.0.1", "::1", "localhost")
    forward = ("use --host 0.0.0.0 and a fixed --port, forward that TCP port on your router/firewall, and "
               "--announce /ip4/<public-ip>/tcp/<port>")
    announced = [ip for ip in map(_maddr_ip, cfg.announce) if ip is not None]
    if cfg.announce:
        if announced and all(ip.is_loopback for ip in announced):
            return Check("reachable", FAIL, f"announcing only loopback addresses ({' '.join(cfg.announce)})", forward)
        return Check("reachable", OK, f"peers will dial {' '.join(cfg.announce)} (that port must be open and "
                     "forwarded to this machine)")
    if loopback_host:
        return Check("reachable", FAIL, f"listening on {cfg.host} only: peers on other machines cannot open "
                     "connections to this node", forward)
    public_peers = [ip for ip in remote if ip.is_global]
    source = _source_ip(public_peers[0]) if public_peers else None
    if source is not None and not source.is_global:
        port_hint = "" if cfg.port else " (a random port cannot be forwarded: pick one)"
        return Check("reachable", WARN, f"this machine reaches the swarm from private address {source}: behind NAT, "
                     "peers without an open connection to this node cannot reach it", forward + port_hint)
    detail = f"listening on {cfg.host}:{cfg.port or 'a random port'}"
    return Check("reachable", OK, detail + (f", reaching peers from {source}" if source else ""))


def check_metrics_port(cfg: NodeConfig) -> Check:
    if cfg.metrics_port < 0:
        return Check("metrics port", SKIP, "metrics disabled (--metrics-port -1)")
    if cfg.metrics_port == 0:
        return Check("metrics port", OK, "a free port is picked at start (see node.json for which)")
    problem = _port_free(cfg.metrics_host, cfg.metrics_port)
    if problem:
        return Check("metrics port", FAIL, f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {problem}",
                     "another node or exporter uses it: pick another --metrics-port (0 for a free one)")
    return Check("metrics port", OK, f"{cfg.metrics_host}:{cfg.metrics_port} is free")


def planned_vocab_size(cfg: NodeConfig) -> int:
    """The vocabulary the node's data will have: the tokenizer's (256 for raw bytes). DataError if unusable."""
    from node.train.tokenizer import load_tokenizer

    return load_tokenizer(cfg.tokenizer or None).vocab_size


def model_parameters(cfg: NodeConfig, vocab_size: int = 256) -> int:
    """Parameter count of the configured model (built on the meta device: nothing is allocated)."""
    import torch

    from node.train.model import count_parameters, make_model

    with torch.device("meta"):
        return count_parameters(make_model(cfg, vocab_size, load_weights=False))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each kind of tensor a node holds, and where: on the training device or in host RAM (the same
    place on CPU). Activations are an estimate; the rest follows from the parameter count."""

    parts: dict[str, int]  # name -> bytes, in the order printed
    on_device: frozenset[str]  # names held on the training device (the others: host RAM)
    cuda: bool

    def device_bytes(self) -> int:
        return int(MEMORY_SLACK * sum(v for k, v in self.parts.items() if k in self.on_device or not self.cuda))

    def host_bytes(self) -> int:
        return int(MEMORY_SLACK * sum(v for k, v in self.parts.items() if k not in self.on_device)) if self.cuda else 0

    def describe(self) -> str:
        return ", ".join(f"{name} {'~' if name == 'activations' else ''}{_gib(size)}" for name, size in self.parts.items())


def _activation_bytes(cfg: NodeConfig, vocab_size: int, cuda: bool) -> int:
    """The estimated activations of one micro-batch's forward and backward pass."""
    batch = math.ceil(cfg.batch_size / cfg.micro_batches)
    if cfg.model == "builtin":
        width, heads, layers = cfg.d_model, cfg.n_heads, cfg.n_layers
        return FLOAT_BYTES * batch * cfg.context * (layers * (16 * width + 2 * heads * cfg.context) + 3 * vocab_size)
    from node.train.hf_model import activation_bytes
    from node.train.presets import resolved_config

    element = 2 if cuda else FLOAT_BYTES  # bfloat16 autocast on CUDA (trainer.autocast_dtype; builtin: float32)
    return activation_bytes(resolved_config(cfg.model, vocab_size), batch, cfg.context, cfg.grad_checkpointing == "on",
                            element)


def memory_plan(cfg: NodeConfig, parameters: int, vocab_size: int = 256, cuda: bool | None = None) -> MemoryPlan:
    """What one node holds (float32 unless said): weights θ and their gradients; AdamW's two moments; φ and δ;
    the last published boundary (φ, δ: what a donor serves, on the host); one exchange: the sent and received
    tensors (float32) and a wire buffer (`wire_dtype`; blockwise8 also keeps its reference, the initial
    weights in bfloat16); activations (an estimate for batch × context); with
    verification, a replay model (weights, gradients, moments) and `audit_window` retained round starts (φ and
    both moments each). `cuda`: None decides as `check_device` does."""
    import torch

    from protocol.codecs import WIRE_DTYPES, wire_bytes

    if cuda is None:
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
    size = FLOAT_BYTES * parameters
    wire = (wire_bytes(parameters, cfg.wire_dtype) if cfg.wire_dtype in WIRE_DTYPES else size) / max(parameters, 1)
    parts = {"weights": size, "gradients": size, "AdamW moments": 2 * size, "φ+δ": 2 * size,
             "published φ+δ": 2 * size, "exchange": 2 * size + int(wire * parameters),
             "activations": _activation_bytes(cfg, vocab_size, cuda)}
    if cfg.wire_dtype == "blockwise8":
        parts["wire reference"] = 2 * parameters  # the initial weights in bfloat16 (protocol/codecs.py)
    if cfg.verify == "on":
        parts["verification"] = 4 * size + 3 * cfg.audit_window * size
    on_device = frozenset(("weights", "gradients", "AdamW moments", "φ+δ", "activations", "verification"))
    return MemoryPlan(parts, on_device, cuda)


def memory_estimate(cfg: NodeConfig, parameters: int, vocab_size: int = 256) -> int:
    """Bytes the training device must hold (on CPU: everything), with 20% slack: a planning figure."""
    return memory_plan(cfg, parameters, vocab_size).device_bytes()


def _what_fits(cfg: NodeConfig, parameters: int, vocab_size: int, free: int) -> str:
    """The first memory-saving local setting (not part of the manifest) under which the plan fits in `free`."""
    options = [{"micro_batches": m} for m in (2, 4, 8, 16, 32) if m <= cfg.batch_size and m > cfg.micro_batches]
    if cfg.model != "builtin" and cfg.grad_checkpointing == "off":
        options += [{"grad_checkpointing": "on", **option} for option in [{}, *options]]
    for option in options:
        changed = dataclasses.replace(cfg, **option)
        if memory_estimate(changed, parameters, vocab_size) <= free:
            return "it fits with " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in option.items())
    return "no local setting makes it fit: a smaller model, smaller --batch-size/--context, or a larger machine"


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_model(cfg: NodeConfig) -> tuple[Check, int, int]:
    """Can the configured model be built for the tokenizer's vocabulary, and does `--init-weights` fit it (keys
    and shapes from the file's header; nothing is allocated)? Returns (check, parameters, vocab size)."""
    import torch

    from node.config import ConfigError
    from node.train.data import DataError
    from node.train.model import count_parameters, init_weights_problems, make_model

    try:
        vocab_size = planned_vocab_size(cfg)
        with torch.device("meta"):
            model = make_model(cfg, vocab_size, load_weights=False)
        problems = init_weights_problems(model, cfg.init_weights) if cfg.init_weights else []
    except (ConfigError, DataError) as error:
        return Check("model", FAIL, str(error), "fix --model, --tokenizer or --init-weights"), 0, 256
    parameters = count_parameters(model)
    detail = f"{cfg.model}: {parameters:,} parameters, vocabulary {vocab_size:,}"
    if problems:
        return (Check("model", FAIL, f"{detail}; init_weights {cfg.init_weights} does not fit ({len(problems)} "
                      f"mismatches): {'; '.join(problems[:6])}", "use weights saved from this very model and vocabulary"),
                parameters, vocab_size)
    return Check("model", OK, detail + (f", weights from {cfg.init_weights}" if cfg.init_weights else "")), \
        parameters, vocab_size


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def check_device(cfg: NodeConfig, parameters: int, vocab_size: int = 256) -> Check:
    import torch

    model = f"{parameters:,} parameters"
    wants_cuda = cfg.device.startswith("cuda")
    if torch.cuda.is_available() and cfg.device != "cpu":
        index = int(cfg.device.split(":")[1]) if cfg.device.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            return Check("device", FAIL, f"{cfg.device} requested but only {torch.cuda.device_count()} GPU(s)",
                         "pick an existing --device cuda:N (nvidia-smi lists them)")
        plan = memory_plan(cfg, parameters, vocab_size, cuda=True)
        need, host = plan.device_bytes(), plan.host_bytes()
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        detail = (f"{name} (CUDA {torch.version.cuda}): {_gib(free)} free of {_gib(total)}; model {model}, "
                  f"~{_gib(need)} on the GPU + ~{_gib(host)} RAM ({plan.describe()})")
        available = _mem_available()
        if need > free:
            return Check("device", FAIL, detail + "; does not fit", "free GPU memory (other processes: nvidia-smi), or "
                         f"use more --micro-batches: {_what_fits(cfg, parameters, vocab_size, free)}")
        if available is not None and host > available:
            return Check("device", FAIL, detail + f"; {_gib(available)} RAM available: the host part does not fit",
                         "free RAM, or a machine with more memory")
        if need > 0.8 * free:
            return Check("device", WARN, detail + "; fits, barely",
                         "little headroom: close other GPU jobs or use more --micro-batches")
        return Check("device", OK, detail + "; fits")
    if wants_cuda:
        why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
               else "no CUDA device is visible (driver, container --gpus, CUDA_VISIBLE_DEVICES)")
        return Check("device", FAIL, f"--device {cfg.device} but {why}",
                     "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/"
                     "cu126) and check nvidia-smi, or use --device cpu")
    plan = memory_plan(cfg, parameters, vocab_size, cuda=False)
    need = plan.device_bytes()
    available = _mem_available()
    detail = f"CPU ({os.cpu_count()} cores, no CUDA GPU); model {model}, ~{_gib(need)} of tensors ({plan.describe()})"
    if available is not None:
        detail += f"; {_gib(available)} RAM available"
        if need > available:
            return Check("device", FAIL, detail + "; does not fit", _what_fits(cfg, parameters, vocab_size, available))
        detail += "; fits"
    fine = parameters <= 20_000_000
    return Check("device", OK if fine else WARN, detail,
                 "" if fine else "training this model on CPU is slow: a CUDA GPU is recommended")


def checkpoint_bytes(parameters: int) -> int:
    """θ, φ, momentum and both AdamW moments, plus a little metadata."""
    return 5 * FLOAT_BYTES * parameters + 64 * 1024


def check_disk(cfg: NodeConfig, parameters: int) -> Check:
    free_dirs = (d for d in candidates(cfg.work_dir) if not is_locked(d))
    work_dir = next(free_dirs, None)
    if work_dir is None:
        return Check("disk", FAIL, f"work dir {cfg.work_dir} is in use by another running node",
                     "give every node its own --work-dir (or a {slot} work dir), or stop the other node")
    work_dir = work_dir.resolve()
    existing = work_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".gossiptrain-doctor-"):
            pass
    except OSError as error:
        return Check("disk", FAIL, f"cannot write in {existing}: {error}",
                     f"choose a writable --work-dir (now {cfg.work_dir}) or fix its permissions")
    free = shutil.disk_usage(existing).free
    per_checkpoint = checkpoint_bytes(parameters)
    need = (cfg.checkpoint_keep + 1) * per_checkpoint  # keep N, plus the one being written
    detail = (f"{work_dir}: {_gib(free)} free; checkpoints ~{_gib(per_checkpoint)} each, "
              f"{cfg.checkpoint_keep} kept (+1 while writing) = {_gib(need)}")
    if free < need:
        return Check("disk", FAIL, detail, "free space, point --work-dir at a larger disk, or lower --checkpoint-keep")
    if free < 2 * need + 2**30:
        return Check("disk", WARN, detail, "little headroom: logs and history grow too; free some space")
    return Check("disk", OK, detail)


async def check_swarm(cfg: NodeConfig, clock_window: float) -> list[Check]:
    """Reach the initial peers as a DHT client: live peers, the swarm's manifest vs ours, clock skew."""
    from node.ops.status import SwarmUnreachable
    from node.train.data import DataError

    if not cfg.initial_peers:
        return _no_swarm_to_check(cfg)
    try:
        ours = _our_manifest(cfg)
    except DataError as error:
        return [Check("swarm", FAIL, f"cannot load the training data: {error}", "fix --data"),
                Check("clock skew", SKIP, "not measured")]
    try:
        swarm, clocks = await _read_swarm_and_clocks(cfg, clock_window)
    except SwarmUnreachable as error:
        return [Check("swarm", FAIL, str(error), "check the --initial-peer multiaddrs (any live node's 'others join "
                      "with' line), that the peer is up, and that firewalls allow the TCP port"),
                Check("clock skew", SKIP, "not measured: the swarm is unreachable")]
    checks = [_swarm_manifest_check(cfg, swarm, ours)]
    if not clocks:
        checks.append(Check("clock skew", SKIP, "no live peer answered a ping or published its clock"))
        return checks
    skew = _clock_skew_check(clocks)
    checks.append(skew)
    if skew.verdict == FAIL and checks[0].verdict == WARN:
        # the swarm looked empty: its short-lived records seem expired to us
        checks[0].detail += " (with this clock skew, peers' presence records look expired on this machine)"
    return checks


def _no_swarm_to_check(cfg: NodeConfig) -> list[Check]:
    """The swarm and clock checks when there is no initial peer to reach."""
    if cfg.initial_peers_file:
        return [
            Check("swarm", WARN, f"no running peer in {cfg.initial_peers_file} yet: the node would wait up to "
                  "5 minutes for one, then exit 1", "start the node that writes it (the bootstrap node) first"),
            Check("clock skew", SKIP, "no peers to compare clocks with yet"),
        ]
    return [
        Check("swarm", SKIP, "no --initial-peer: this node would start a new swarm"),
        Check("clock skew", SKIP, "no peers to compare clocks with (pass --initial-peer)"),
    ]


def _our_manifest(cfg: NodeConfig) -> str:
    """The manifest hash this config would publish (loads the training data; DataError if it cannot)."""
    from protocol import PROTOCOL_VERSION, manifest_hash

    from node.train.data import load_run_corpus

    corpus = load_run_corpus(cfg)
    return manifest_hash(cfg.manifest(corpus.fingerprint, PROTOCOL_VERSION, corpus.vocab_size, corpus.tokenizer))


async def _read_swarm_and_clocks(cfg: NodeConfig, clock_window: float
                                 ) -> tuple[SwarmStatus, dict[str, tuple[float, float]]]:
    """As a DHT client: the swarm's registration, and clock offsets of up to MAX_CLOCK_PEERS peers as
    {peer: (offset, round trip)} (round trip NaN where only a presence record gave the clock). SwarmUnreachable."""
    from node.ops.status import dht_client, measure_clock, read_swarm, sample_clock_offsets

    async with dht_client(cfg.initial_peers) as dht:
        swarm = await read_swarm(dht, cfg.run_id)
        targets = _clock_targets(cfg.initial_peers, swarm)
        pings = await asyncio.gather(*(measure_clock(dht, peer, maddrs) for peer, maddrs in targets.items()))
        clocks = {peer: ping for peer, ping in zip(targets, pings) if ping is not None}
        if len(clocks) < len(targets):  # peers that did not answer a ping: their presence records' clocks
            sampled = await sample_clock_offsets(dht, cfg.run_id, clock_window)
            clocks.update({peer: (offset, math.nan) for peer, offset in sampled.items() if peer not in clocks})
    return swarm, clocks


def _clock_targets(initial_peers: list[str], swarm: SwarmStatus) -> dict[str, list[str]]:
    """The peers to ping, with their addresses: the initial peers (addresses known for sure), then the live peers
    the swarm lists; at most MAX_CLOCK_PEERS."""
    targets = {m.rsplit("/p2p/", 1)[1]: [m.rsplit("/p2p/", 1)[0]] for m in initial_peers if "/p2p/" in m}
    for peer in swarm.peers + swarm.other_manifest:
        targets.setdefault(peer.peer_id, peer.maddrs)
    return dict(list(targets.items())[:MAX_CLOCK_PEERS])


def _swarm_manifest_check(cfg: NodeConfig, swarm: SwarmStatus, ours: str) -> Check:
    """Is the swarm registered, does its manifest match ours, and does it have live peers?"""
    if swarm.manifest is None:
        return Check("swarm", WARN, f"reached the DHT, but no swarm {cfg.run_id!r} is registered there",
                     "check --run-id; or you are the first node of this run")
    if swarm.manifest != ours:
        return Check("swarm", FAIL, f"swarm {cfg.run_id!r} runs manifest {swarm.manifest[:12]}, this config "
                     f"gives {ours[:12]}: the node would be refused",
                     "use exactly the swarm's model, data, optimizer, outer-step and verification settings "
                     "(the run's published config), and the same gossiptrain protocol version")
    return Check("swarm", OK if swarm.peers else WARN,
                 f"swarm {cfg.run_id!r}: {len(swarm.peers)} live peer(s), manifest {ours[:12]} matches",
                 "" if swarm.peers else "no live peer right now: the node will wait for --min-peers")


def _clock_skew_check(clocks: dict[str, tuple[float, float]]) -> Check:
    """The verdict on the largest clock offset among the measured peers."""
    worst_peer, (worst, round_trip) = max(clocks.items(), key=lambda item: abs(item[1][0]))
    accuracy = (f"±{round_trip / 2 * 1000:.1f} ms by DHT ping" if math.isfinite(round_trip)
                else "±~0.5 s from its presence record")
    detail = (f"{len(clocks)} peer(s); largest offset {worst:+.2f}s (…{worst_peer[-8:]}, {accuracy}; "
              f"positive: that peer's clock is ahead of ours)")
    fix = ("sync this machine's clock (timedatectl set-ntp true, or chrony/ntpd): hivemind's DHT refuses to join "
           "through a peer whose clock differs by more than 3 s, and record expirations shift by the skew")
    if abs(worst) > MAX_CLOCK_SKEW:
        return Check("clock skew", FAIL, detail, fix)
    if abs(worst) > WARN_CLOCK_SKEW:
        return Check("clock skew", WARN, detail, fix)
    return Check("clock skew", OK, detail)


async def run_checks(cfg: NodeConfig, clock_window: float | None = None,
                     progress: Callable[[Check], None] = lambda check: None) -> list[Check]:
    window = clock_window if clock_window is not None else min(2 * cfg.heartbeat + 0.5, 10.0)
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        progress(check)

    add(check_python())
    add(check_packages())
    add(await check_p2pd())
    add(check_listen_port(cfg))
    add(check_reachable(cfg))
    add(check_metrics_port(cfg))
    model_check, parameters, vocab_size = check_model(cfg)
    add(model_check)
    if model_check.verdict == FAIL:
        add(Check("device", SKIP, "no model to size"))
    else:
        add(check_device(cfg, parameters, vocab_size))
    add(check_disk(cfg, parameters))
    for check in await check_swarm(cfg, window):
        add(check)
    return checks


def to_json(checks: list[Check]) -> dict:
    counts = {verdict: sum(c.verdict == verdict for c in checks) for verdict in (OK, WARN, FAIL, SKIP)}
    return {"verdict": FAIL if counts[FAIL] else WARN if counts[WARN] else OK, "counts": counts,
            "checks": [asdict(c) for c in checks]}

