"""Emulated networks for local swarms: every node on a host of its own (Linux, root).

A ``Network`` is one Linux bridge in the root namespace plus N hosts. Each host is a network
namespace with loopback up and one veth (``eth0`` inside) whose other end is a port of the
bridge. Hosts get addresses in a private /24 picked free for this run (default inside
10.213.0.0/16); the bridge itself gets the first address, so the root namespace (the
launcher, a Prometheus scrape) reaches every host and every host reaches every other. There
is no default route in a host: nothing it runs can reach any other address.

What can be changed while processes run (DESIGN.md section 10 lists what the kernel offers):

- ``set_rate(i, "20mbit")``: a tbf qdisc on the host's egress (``None`` removes it);
  ``ingress=`` limits what the host receives (tbf on its bridge port).
- ``cut(i)`` / ``restore(i)``: the bridge port down / up. Packets are dropped, not refused:
  a connection to or from a cut host hangs until its own timeouts.
- ``cpu=[CpuShare(core=0, quota=0.5), ...]`` at creation: a node pinned to one core
  (``taskset``) and capped to a fraction of a CPU (cgroup v1 ``cpu.cfs_quota_us``, or v2
  ``cpu.max`` where the cpu controller lives there), for heterogeneous peers.

``command(i, argv)`` is argv run inside host i: ``[sh -c 'join cgroup'] ip netns exec NS
[taskset -c CORE] argv``; every step execs, so the process started is argv itself (its pid,
its signals). ``swarm_hosts()`` hands the hosts to LocalSwarm (node/tools/swarm.py).

Names carry a prefix and a random tag (``gt3fa9c1-br``, ``gt3fa9c1-h0``, ``gt3fa9c1-v0``), so
parallel runs do not collide. The bridge's alias records its owner (pid and start time):
a network whose owner is gone (a run killed with SIGKILL) is removed by the next
``Network`` started with the same prefix, or by ``cleanup_stale()``. ``close()`` (also the
context manager's exit and an atexit hook) kills what still runs in the hosts, deletes the
namespaces, veths, bridge and cgroups, and may be called any number of times.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.tools.swarm import NodeHost

DEFAULT_PREFIX = "gt"
DEFAULT_BASE = "10.213.0.0/16"
HOST_IFACE = "eth0"  # the host's end of its veth, inside its namespace
IFNAMSIZ = 15  # longest interface name Linux accepts
TAG_HEX = 6  # random tag: 3 bytes
TBF_BURST = "256kb"
TBF_LATENCY = "400ms"
CFS_PERIOD_US = 100_000
COMMAND_TIMEOUT = 20.0  # one ip/tc command
KILL_WAIT_S = 10.0
OWNER_MARK = "gossiptrain-netns"
REQUIRED_TOOLS = ("ip", "tc")
LOCK_PATH = Path(tempfile.gettempdir()) / "gossiptrain-netns.lock"

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)$")
_RATE_SCALE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,4}$")


class NetnsError(RuntimeError):
    """An emulated-network operation failed (the message names the command and what it printed)."""


class NetnsUnavailable(NetnsError):
    """Emulated networks cannot run here: not root, or `ip`/`tc` missing. ``reason`` is a skip reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- pure parts
def rate_bits(rate: str) -> float:
    """A tc rate ("20mbit", "512kbit", "2.5mbps") in bits per second; ValueError if tc would not read it alike."""
    match = _RATE.match(rate.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"bad rate {rate!r}: a positive number and a unit (bit, kbit, mbit, gbit, bps, kbps, mbps)")
    return float(match.group(1)) * _RATE_SCALE[match.group(2)]


def tbf_args(rate: str, burst: str = TBF_BURST, latency: str = TBF_LATENCY) -> list[str]:
    """The qdisc part of `tc qdisc replace dev DEV root ...` that limits a device's egress to `rate`."""
    rate_bits(rate)
    return ["tbf", "rate", rate, "burst", burst, "latency", latency]


@dataclass(frozen=True)
class Names:
    """Interface, namespace and cgroup names of one network: prefix + random tag + role."""

    prefix: str
    tag: str

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise ValueError(f"bad prefix {self.prefix!r}: 1-5 lowercase letters or digits, starting with a letter")
        if not re.fullmatch(f"[0-9a-f]{{{TAG_HEX}}}", self.tag):
            raise ValueError(f"bad tag {self.tag!r}: {TAG_HEX} hex digits")

    @classmethod
    def random(cls, prefix: str = DEFAULT_PREFIX) -> Names:
        return cls(prefix, secrets.token_hex(TAG_HEX // 2))

    @property
    def stem(self) -> str:
        return f"{self.prefix}{self.tag}"

    @property
    def bridge(self) -> str:
        return f"{self.stem}-br"

    def netns(self, index: int) -> str:
        return self._checked(f"{self.stem}-h{index}")

    def veth(self, index: int) -> str:
        """The root-namespace end of host `index`'s veth: its bridge port."""
        return self._checked(f"{self.stem}-v{index}")

    def cgroup(self, index: int) -> str:
        return self.netns(index)

    @staticmethod
    def _checked(name: str) -> str:
        if len(name) > IFNAMSIZ:
            raise ValueError(f"name {name!r} is longer than {IFNAMSIZ} characters (too many hosts or a long prefix)")
        return name

    @staticmethod
    def pattern(prefix: str) -> re.Pattern[str]:
        """Matches names of any network with this prefix; group 1 is the tag."""
        return re.compile(rf"^{re.escape(prefix)}([0-9a-f]{{{TAG_HEX}}})-(br|h\d+|v\d+)$")


def max_hosts(prefix: str = DEFAULT_PREFIX) -> int:
    """How many hosts fit: interface names and the /24 (the bridge takes .1, hosts .2 to .254)."""
    digits = IFNAMSIZ - len(prefix) - TAG_HEX - 2
    return min(10**digits, 253)


def pick_subnet(base: str | ipaddress.IPv4Network, used: Iterable[ipaddress.IPv4Network],
                rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A random /24 inside `base` that overlaps none of the networks in use (addresses and routes of this host)."""
    base = ipaddress.IPv4Network(base)
    if base.prefixlen > 24:
        raise ValueError(f"base {base} is smaller than a /24")
    used = [network for network in used if network.version == 4 and network.prefixlen > 0]  # a default route is no clash
    free = [subnet for subnet in base.subnets(new_prefix=24) if not any(subnet.overlaps(u) for u in used)]
    if not free:
        raise NetnsError(f"no free /24 left in {base}")
    return (rng or random.Random()).choice(free)


@dataclass(frozen=True)
class Addressing:
    """The addresses of one network: the bridge takes the first host address, host i the (i+2)-th."""

    subnet: ipaddress.IPv4Network

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    @property
    def bridge(self) -> str:
        return str(self.subnet.network_address + 1)

    def host(self, index: int) -> str:
        address = self.subnet.network_address + 2 + index
        if address >= self.subnet.broadcast_address:
            raise ValueError(f"host {index} does not fit in {self.subnet}")
        return str(address)


def format_owner(pid: int, start_ticks: int) -> str:
    return f"{OWNER_MARK} owner={pid}:{start_ticks}"


def parse_owner(alias: str | None) -> tuple[int, int] | None:
    """(pid, start ticks) from a bridge alias written by format_owner; None for anything else."""
    match = re.fullmatch(rf"{OWNER_MARK} owner=(\d+):(\d+)", (alias or "").strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def stale_tags(prefix: str, bridges: dict[str, str | None], other_names: Iterable[str],
               owner_alive: Callable[[int, int], bool]) -> set[str]:
    """Tags of networks with this prefix left behind by a run that is gone.

    bridges: {bridge name: its alias}; other_names: namespace, veth and cgroup names seen. A network is stale
    when its bridge's owner is gone (or the alias is not ours) or when its bridge is gone (a network is created
    bridge first and torn down bridge last, under one lock, so a live one always has its bridge)."""
    pattern = Names.pattern(prefix)
    live_bridges, stale = set(), set()
    for name, alias in bridges.items():
        match = pattern.match(name)
        if not match or match.group(2) != "br":
            continue
        owner = parse_owner(alias)
        if owner is not None and owner_alive(*owner):
            live_bridges.add(match.group(1))
        else:
            stale.add(match.group(1))
    for name in other_names:
        match = pattern.match(name)
        if match and match.group(1) not in live_bridges:
            stale.add(match.group(1))
    return stale


JOIN_CGROUP = 'echo $$ > "$1" && shift && exec "$@"'  # join the cgroup whose cgroup.procs is $1, then become "$@"


def host_prefix(netns: str, cgroup_procs: str | None = None, core: int | None = None) -> list[str]:
    """The command prefix that runs a command inside host `netns`, in a cgroup and pinned to a core.

    The cgroup is joined before `ip netns exec` (which mounts a fresh /sys, hiding /sys/fs/cgroup); each step
    execs the next, so the pid started is the command's own."""
    prefix: list[str] = []
    if cgroup_procs:
        prefix += ["sh", "-c", JOIN_CGROUP, "sh", cgroup_procs]
    prefix += ["ip", "netns", "exec", netns]
    if core is not None:
        prefix += ["taskset", "-c", str(core)]
    return prefix


@dataclass(frozen=True)
class CpuShare:
    """A host's CPU: pinned to `core` (taskset) and/or capped at `quota` CPUs (0.5: half of one core)."""

    core: int | None = None
    quota: float | None = None

    def __post_init__(self) -> None:
        if self.core is not None and self.core < 0:
            raise ValueError(f"bad core {self.core}")
        if self.quota is not None and not 0.01 <= self.quota <= 1024:
            raise ValueError(f"bad cpu quota {self.quota}: a fraction of CPUs, 0.01 to 1024")

    def quota_us(self, period_us: int = CFS_PERIOD_US) -> int | None:
        return None if self.quota is None else max(1000, round(self.quota * period_us))


@dataclass(frozen=True)
class CpuCgroups:
    """Where cpu cgroups are made: the cpu controller's directory for this process, and its version."""

    version: int  # 1: cpu.cfs_quota_us, 2: cpu.max
    root: Path

    def limit_files(self, quota_us: int, period_us: int = CFS_PERIOD_US) -> dict[str, str]:
        """File name -> content that caps a cgroup at quota_us per period_us."""
        if self.version == 1:
            return {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": str(quota_us)}
        return {"cpu.max": f"{quota_us} {period_us}"}


def find_cpu_cgroups(mounts: str, self_cgroup: str, v2_controllers: Callable[[Path], str]) -> CpuCgroups | None:
    """The cpu controller from /proc/self/mounts and /proc/self/cgroup text: v1 (a `cgroup` mount with the cpu
    option) first, else v2 (a `cgroup2` mount whose cgroup.controllers lists cpu); None if neither."""
    paths_v1, path_v2 = {}, None
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            path_v2 = parts[2]
        for controller in parts[1].split(","):
            paths_v1[controller] = parts[2]
    v2_mounts = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount_point, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup" and "cpu" in options and "cpu" in paths_v1:
            return CpuCgroups(1, Path(mount_point) / paths_v1["cpu"].lstrip("/"))
        if fstype == "cgroup2":
            v2_mounts.append(Path(mount_point))
    for mount_point in v2_mounts:
        if path_v2 is not None and "cpu" in v2_controllers(mount_point).split():
            return CpuCgroups(2, mount_point / path_v2.lstrip("/"))
    return None


# ---------------------------------------------------------------------------------------------- the system
def unavailable_reason() -> str | None:
    """Why emulated networks cannot run here (a pytest skip reason), or None when they can."""
    if os.geteuid() != 0:
        return f"emulated networks need root (network namespaces, veth, tc); running as uid {os.geteuid()}"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"emulated networks need {' and '.join(missing)} (iproute2) on PATH"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    return None


def require() -> None:
    reason = unavailable_reason()
    if reason:
        raise NetnsUnavailable(reason)


def run_tool(argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run one ip/tc command; NetnsError with its output if it fails and `check`."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise NetnsError(f"`{' '.join(argv)}` took over {timeout:.0f}s") from error
    except FileNotFoundError as error:
        raise NetnsUnavailable(f"{argv[0]} is not installed") from error
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done


def _json(argv: Sequence[str]) -> list[dict[str, Any]]:
    text = run_tool(argv).stdout.strip()
    return json.loads(text) if text else []


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time since boot); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def owner_alive(pid: int, start_ticks: int) -> bool:
    return process_start_ticks(pid) == start_ticks


def list_netns() -> list[str]:
    return [entry.get("name", "") for entry in _json(["ip", "-j", "netns", "list"])]


def list_links() -> dict[str, str | None]:
    """Interfaces of the root namespace: name -> alias."""
    return {entry["ifname"]: entry.get("ifalias") for entry in _json(["ip", "-j", "link", "show"])}


def used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of this host's addresses and routes (a new subnet must overlap none)."""
    networks = []
    for entry in _json(["ip", "-j", "-4", "addr", "show"]):
        for info in entry.get("addr_info", []):
            networks.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in _json(["ip", "-j", "-4", "route", "show", "table", "all"]):
        destination = route.get("dst", "")
        with contextlib.suppress(ValueError):
            if destination and destination != "default":
                networks.append(ipaddress.IPv4Network(destination, strict=False))
    return networks


def cpu_cgroups() -> CpuCgroups | None:
    def controllers(mount_point: Path) -> str:
        try:
            return (mount_point / "cgroup.controllers").read_text()
        except OSError:
            return ""

    try:
        mounts, self_cgroup = Path("/proc/self/mounts").read_text(), Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    return find_cpu_cgroups(mounts, self_cgroup, controllers)


def netns_pids(netns: str) -> list[int]:
    done = run_tool(["ip", "netns", "pids", netns], check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def kill_netns_processes(netns: str, wait: float = KILL_WAIT_S) -> None:
    """SIGKILL every process inside a namespace of ours (what a test left running there) and wait for them to go."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        pids = netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Creation and stale cleanup of networks are serialized across processes (a half-made network is not stale)."""
    with open(LOCK_PATH, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_network(names: Names, hosts: Iterable[int] | None, cgroups: CpuCgroups | None) -> None:
    """Delete what exists of one network (namespaces, veths, bridge, cgroups); errors of gone things ignored."""
    netns = set(list_netns())
    links = list_links()
    pattern = Names.pattern(names.prefix)
    indices = set(hosts or ())
    for name in list(netns) + list(links):
        match = pattern.match(name)
        if match and match.group(1) == names.tag and match.group(2) != "br":
            indices.add(int(match.group(2)[1:]))
    for index in sorted(indices):
        if names.netns(index) in netns:
            kill_netns_processes(names.netns(index))
            run_tool(["ip", "netns", "del", names.netns(index)], check=False)
        if names.veth(index) in links:
            run_tool(["ip", "link", "del", names.veth(index)], check=False)
    if names.bridge in links:
        run_tool(["ip", "link", "del", names.bridge], check=False)
    if cgroups is not None:
        for path in cgroups.root.glob(f"{names.stem}-h*"):
            with contextlib.suppress(OSError):
                path.rmdir()  # refused while a process is still in it: it is not ours to kill then


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove the networks with this prefix whose owner is gone; returns their tags."""
    require()
    cgroups = cpu_cgroups()
    with _lock():
        links = list_links()
        others = list_netns() + list(links)
        if cgroups is not None and cgroups.root.is_dir():
            others += [path.name for path in cgroups.root.iterdir() if path.is_dir()]
        tags = sorted(stale_tags(prefix, links, others, owner_alive))
        for tag in tags:
            _remove_network(Names(prefix, tag), None, cgroups)
    return tags


# ---------------------------------------------------------------------------------------------- the network
@dataclass
class Host:
    """One emulated machine: a namespace with `address`, reached through bridge port `veth`."""

    index: int
    netns: str
    veth: str
    address: str
    cpu: CpuShare | None = None
    cgroup: Path | None = None
    rate: str | None = None
    ingress_rate: str | None = None
    cut: bool = False

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a command on this host (see host_prefix)."""
        procs = str(self.cgroup / "cgroup.procs") if self.cgroup is not None else None
        return host_prefix(self.netns, procs, self.cpu.core if self.cpu else None)


@dataclass
class Network:
    """N hosts on one bridge; nothing exists until start() (or `with Network(...) as net:`)."""

    num_hosts: int
    prefix: str = DEFAULT_PREFIX
    base: str = DEFAULT_BASE
    rate: str | None = None  # egress limit of every host at start
    cpu: Sequence[CpuShare | None] | None = None  # per host
    names: Names = field(init=False)
    addressing: Addressing | None = field(init=False, default=None)
    hosts: list[Host] = field(init=False, default_factory=list)
    cgroups: CpuCgroups | None = field(init=False, default=None)
    _processes: list[subprocess.Popen] = field(init=False, default_factory=list)
    _started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not 1 <= self.num_hosts <= max_hosts(self.prefix):
            raise ValueError(f"num_hosts must be 1 to {max_hosts(self.prefix)}, not {self.num_hosts}")
        if self.rate is not None:
            rate_bits(self.rate)
        if self.cpu is not None and len(self.cpu) != self.num_hosts:
            raise ValueError(f"cpu: one CpuShare (or None) per host, {self.num_hosts}, not {len(self.cpu)}")
        self.names = Names.random(self.prefix)

    # -- life
    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> Network:
        require()
        if self._started:
            return self
        self._started = True
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        names = self.names
        needs_cgroup = any(share is not None and share.quota is not None for share in self.cpu or ())
        if needs_cgroup:
            self.cgroups = cpu_cgroups()
            if self.cgroups is None:
                raise NetnsUnavailable("a cpu quota needs the cgroup cpu controller (v1 cpu or v2 cpu.max); none found")
        cleanup_stale(self.prefix)
        with _lock():
            self.addressing = Addressing(pick_subnet(self.base, used_networks()))
            run_tool(["ip", "link", "add", "name", names.bridge, "type", "bridge"])
            owner = format_owner(os.getpid(), process_start_ticks(os.getpid()) or 0)
            run_tool(["ip", "link", "set", names.bridge, "alias", owner])
        plen = self.addressing.prefixlen
        run_tool(["ip", "addr", "add", f"{self.addressing.bridge}/{plen}", "dev", names.bridge])
        run_tool(["ip", "link", "set", names.bridge, "up"])
        for index in range(self.num_hosts):
            share = self.cpu[index] if self.cpu else None
            host = Host(index, names.netns(index), names.veth(index), self.addressing.host(index), share)
            self.hosts.append(host)
            ns = host.netns
            run_tool(["ip", "netns", "add", ns])
            run_tool(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", HOST_IFACE, "netns", ns])
            run_tool(["ip", "link", "set", host.veth, "master", names.bridge, "up"])
            run_tool(["ip", "-n", ns, "addr", "add", f"{host.address}/{plen}", "dev", HOST_IFACE])
            run_tool(["ip", "-n", ns, "link", "set", HOST_IFACE, "up"])
            run_tool(["ip", "-n", ns, "link", "set", "lo", "up"])
            if share is not None and share.quota is not None:
                host.cgroup = self._make_cgroup(names.cgroup(index), share)
            if self.rate is not None:
                self.set_rate(index, self.rate)

    def _make_cgroup(self, name: str, share: CpuShare) -> Path:
        assert self.cgroups is not None
        path = self.cgroups.root / name
        try:
            if self.cgroups.version == 2:
                with contextlib.suppress(OSError):  # already enabled, or not allowed: writing cpu.max then says
                    (self.cgroups.root / "cgroup.subtree_control").write_text("+cpu")
            path.mkdir(exist_ok=True)
            for file_name, content in self.cgroups.limit_files(share.quota_us() or 0).items():
                (path / file_name).write_text(content)
        except OSError as error:
            raise NetnsError(f"cannot set up cpu cgroup {path}: {error}") from error
        return path

    def close(self) -> None:
        """Kill what still runs in the hosts, delete namespaces, veths, bridge and cgroups. Idempotent."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.close)
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=KILL_WAIT_S)
        self._processes.clear()
        with _lock():
            _remove_network(self.names, range(self.num_hosts), self.cgroups or cpu_cgroups())

    # -- hosts
    def host(self, index: int) -> Host:
        if not self._started:
            raise NetnsError("the network is not started (use start() or `with Network(...)`)")
        return self.hosts[index]

    @property
    def bridge_address(self) -> str:
        if self.addressing is None:
            raise NetnsError("the network is not started")
        return self.addressing.bridge

    @property
    def addresses(self) -> list[str]:
        return [host.address for host in self.hosts]

    def set_rate(self, index: int, rate: str | None, *, burst: str = TBF_BURST, latency: str = TBF_LATENCY,
                 ingress: str | None = None) -> None:
        """Limit host `index`'s egress to `rate` (None: unlimited); `ingress` limits what it receives likewise."""
        host = self.host(index)
        self._tbf(["tc", "-n", host.netns], HOST_IFACE, rate, burst, latency)
        self._tbf(["tc"], host.veth, ingress, burst, latency)
        host.rate, host.ingress_rate = rate, ingress

    @staticmethod
    def _tbf(tc: list[str], device: str, rate: str | None, burst: str, latency: str) -> None:
        if rate is None:
            run_tool([*tc, "qdisc", "del", "dev", device, "root"], check=False)  # none there: nothing to remove
        else:
            run_tool([*tc, "qdisc", "replace", "dev", device, "root", *tbf_args(rate, burst, latency)])

    def qdisc(self, index: int) -> str:
        """`tc qdisc show` of the host's eth0 (for a look at what is configured)."""
        return run_tool(["tc", "-n", self.host(index).netns, "qdisc", "show", "dev", HOST_IFACE]).stdout

    def cut(self, index: int) -> None:
        """Take host `index` off the network (its bridge port down): its packets, and those to it, are dropped."""
        run_tool(["ip", "link", "set", self.host(index).veth, "down"])
        self.hosts[index].cut = True

    def restore(self, index: int) -> None:
        run_tool(["ip", "link", "set", self.host(index).veth, "up"])
        self.hosts[index].cut = False

    # -- running things on hosts
    def command(self, index: int, argv: Sequence[str]) -> list[str]:
        return [*self.host(index).prefix, *argv]

    def run(self, index: int, argv: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
        """subprocess.run of argv on host `index` (a timeout is required: every wait is bounded)."""
        return subprocess.run(self.command(index, argv), timeout=timeout, **kwargs)

    def popen(self, index: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """subprocess.Popen of argv on host `index`; close() kills it if it still runs."""
        process = subprocess.Popen(self.command(index, argv), **kwargs)
        self._processes.append(process)
        return process

    def pids(self, index: int) -> list[int]:
        return netns_pids(self.host(index).netns)

    def swarm_hosts(self) -> list[NodeHost]:
        """The hosts as LocalSwarm placements: node i listens on, announces and serves /metrics at host i's address."""
        return [NodeHost(host.address, tuple(host.prefix)) for host in self.hosts]
