"""The benchmarks' second peer as a child process: the plumbing `bench exchange` and `bench state-sync` share.

A benchmark runs its partner peer (the exchange's responder, state-sync's donor) as a
separate OS process, ``python -m node.<module> --serve --numel N --lifetime S``, with its
own event loop, GIL and p2pd. The child side (``serve_entry``) keeps its stdout for one
ready line (a prefix and a JSON object) and sends everything else to stderr; it serves
until its stdin closes (``wait_for_eof``), or gives up after ``--lifetime`` seconds. The
parent side (``ChildProcess``) starts it in its own session, reads the ready line, stops
it by closing its stdin (then SIGTERM, SIGKILL to its process group, then to whatever it
left running in its session, its p2pd included) and keeps its stderr for failure reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

import numpy as np
import uvloop

LOG_TAIL_LINES = 20  # how much of the child's stderr a failure report shows
POLL_INTERVAL = 0.2  # seconds: the child's exit status, its leftover session members
KILL_WAIT = 5.0  # seconds to wait for the child (or its leftovers) after each signal

ServeMain = Callable[[int, float, IO[str]], Awaitable[int]]  # (numel, lifetime, ready_out) -> exit status


# ---------------------------------------------------------------------- the child's side
async def wait_for_eof(stream: IO[bytes], limit: float) -> bool:
    """Read ``stream`` (our stdin) until it closes; False if ``limit`` seconds pass first."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stream)
    try:
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass
        return True
    except TimeoutError:
        return False
    finally:
        transport.close()


async def announce_and_serve(role: str, ready_out: IO[str], prefix: str, ready: dict, lifetime: float) -> bool:
    """Write the ready line, then serve until our stdin closes; False (with a message) if ``lifetime`` ran out."""
    ready_out.write(prefix + json.dumps(ready) + "\n")
    ready_out.flush()
    if not await wait_for_eof(sys.stdin.buffer, lifetime):
        print(f"{role}: stdin still open after {lifetime:.0f}s; giving up", file=sys.stderr, flush=True)
        return False
    return True


async def shutdown_p2pd(p2p, role: str | None = None) -> None:
    """Shut down a hivemind P2P (None: it never started), best effort: a warning, prefixed with ``role``, on failure."""
    if p2p is None:
        return
    try:
        await asyncio.wait_for(p2p.shutdown(), 10)
    except Exception as error:  # noqa: BLE001 - best effort; the daemon was terminated
        prefix = f"{role}: " if role else ""
        print(f"{prefix}warning: p2pd shutdown: {error!r}", file=sys.stderr, flush=True)


def serve_entry(argv: list[str], module: str, description: str, role: str, serve_main: ServeMain) -> int:
    """``python -m node.<module> --serve --numel N [--lifetime S]``: run ``serve_main`` on uvloop; its exit status.

    ``serve_main`` gets a private copy of our stdout for the ready line: the real one is
    pointed at stderr, so our prints, hivemind's logging and p2pd's output all land in the
    log the parent shows if the benchmark fails.
    """
    parser = argparse.ArgumentParser(prog=f"python -m node.{module}", description=description)
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--numel", type=int, required=True)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="exit if stdin is still open after this")
    args = parser.parse_args(argv)
    ready_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        return uvloop.run(serve_main(args.numel, args.lifetime, ready_out))
    except Exception as error:  # noqa: BLE001 - a message and exit status 1
        print(f"{role}: failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        ready_out.close()


# ---------------------------------------------------------------------- the parent's side
def machine_line() -> str:
    """The report header's last line: Python, numpy and torch, and the CPUs both peers share."""
    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    torch_note = "imported by hivemind, unused here" if "torch" in sys.modules else "not imported"
    return (
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch_note}; "
        f"CPUs {cpus} ({usable} usable), shared by both peers and their p2pds"
    )


def run_parent(main: Awaitable[int]) -> int:
    """Run a benchmark's main coroutine on uvloop: its status, 130 on Ctrl-C, 1 (with a message) on failure.

    The coroutine's own finally blocks stop the child and both p2pds on every path.
    """
    try:
        return uvloop.run(main)
    except KeyboardInterrupt:
        print("benchmark interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a failed benchmark is a message and exit status 1
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def session_members(session: int) -> list[int]:
    """Processes in session ``session`` and process group ``session`` (the child's: it started both); Linux."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == session and int(fields[3]) == session:
            members.append(int(entry))
    return members


class ChildProcess:
    """A benchmark's partner peer as a child process: started, waited for, stopped, its stderr kept for failures.

    ``role`` names it in messages ("responder", "donor"); it runs ``python -m node.<module>
    --serve --numel N --lifetime S`` and is ready once it prints a line starting with ``ready_prefix``.
    """

    def __init__(self, role: str, module: str, ready_prefix: str) -> None:
        self.role = role
        self.module = module
        self.ready_prefix = ready_prefix
        self.process: asyncio.subprocess.Process | None = None
        self.log = tempfile.TemporaryFile()

    async def start(self, numel: int, lifetime: float, ready_timeout: float) -> dict:
        """Start it and return its ready line's JSON object; fails if it is not ready within ``ready_timeout``."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # where the `node` package lives
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"node.{self.module}", "--serve",
            "--numel", str(numel), "--lifetime", f"{lifetime:.0f}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop it via its stdin
        )  # fmt: skip
        async with asyncio.timeout(ready_timeout):
            while line := await self.process.stdout.readline():
                text = line.decode(errors="replace")
                if text.startswith(self.ready_prefix):
                    return json.loads(text[len(self.ready_prefix) :])
        raise RuntimeError(f"{self.role} exited before it was ready (exit status {await self._wait(KILL_WAIT)})")

    async def exited(self) -> int:
        """Its exit status, once it has exited.

        Polls the return code: ``Process.wait()`` also waits for its pipes to close, and a
        p2pd it leaves behind holds its stdin open (Python 3.11).
        """
        while self.process.returncode is None:
            await asyncio.sleep(POLL_INTERVAL)
        return self.process.returncode

    async def _wait(self, limit: float) -> int | None:
        try:
            return await asyncio.wait_for(self.exited(), limit)
        except TimeoutError:
            return None

    async def stop(self, stop_timeout: float) -> int | None:
        """Close its stdin and wait for it to shut down its p2pd and exit; terminate its group if it hangs."""
        if self.process is None:
            return None
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
        code = await self._wait(stop_timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if code is not None:
                break
            # its own session and process group: the signal reaches its p2pd too
            print(f"warning: {self.role} did not exit within {stop_timeout:.0f}s; sending {sig.name}", file=sys.stderr)
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            code = await self._wait(KILL_WAIT)
        await self._end_leftovers()
        return code

    async def _end_leftovers(self) -> None:
        """End what it left running in its session (its p2pd, when it died without shutting it down)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            leftovers = session_members(self.process.pid)
            if not leftovers:
                return
            print(
                f"warning: the {self.role} left {len(leftovers)} process(es) running; sending {sig.name}",
                file=sys.stderr,
            )
            for pid in leftovers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            for _ in range(int(KILL_WAIT / POLL_INTERVAL)):
                if not session_members(self.process.pid):
                    return
                await asyncio.sleep(POLL_INTERVAL)

    def log_tail(self) -> str:
        """The last ``LOG_TAIL_LINES`` lines of its stderr."""
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def close(self) -> None:
        self.log.close()
