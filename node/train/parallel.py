"""Data-parallel inner steps inside one node: `--devices cpu:N`, `auto` or `cuda:0,cuda:1`.

Rank 0 is the node itself (the daemon's trainer thread); ranks 1..N-1 are worker processes it spawns,
one per further device, joined by a torch.distributed process group (NCCL on GPUs, gloo on CPU) that
rendezvous over a TCP store on 127.0.0.1. Only rank 0 talks to the swarm: the swarm sees one peer.

One inner step: rank 0 draws N consecutive batches from the node's one sampler and hands batch r to
rank r (over the worker's pipe: a few KiB of token ids), every rank computes its gradient, the flat
gradient (and the loss) is all-reduced and divided by N, and every rank applies the identical AdamW
step, so the replicas stay bit-identical. The node's step is thus the mean loss over N x batch_size
sequences, and a verifier replays it in one process on the N batches concatenated
(`Replayer.replay`, `RoundStart.ranks`). Drawing every batch from the node's sampler keeps one data
position to commit, checkpoint and resume, and spares the workers the corpus.

Whenever the trainer starts (or resumes) a round, rank 0 broadcasts its parameters and AdamW state:
whatever happened on rank 0 in between (an outer step, a state sync, a checkpoint restore, an
evaluation) reaches every replica before its next step.

Lifetimes: a worker exits when rank 0 says stop, when its pipe to rank 0 closes or its parent changes
(rank 0 died, even by SIGKILL), and when a collective fails or times out. Rank 0 turns a dead or stuck
worker into a `ParallelError` that names the rank and why, within `timeout` seconds at most.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from node.config import NodeConfig, parse_devices

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = 300.0  # a step's all-reduce or a state broadcast: longer than any honest step (a compile too)
START_TIMEOUT = 180.0  # a worker's spawn, imports and model build (a transformers import and a CUDA init included)
STOP_TIMEOUT = 5.0  # how long a stopping worker gets before it is killed
PARENT_POLL_SECONDS = 1.0  # an idle worker checks this often that rank 0 is still its parent
DIAGNOSE_SECONDS = 2.0  # after a failed collective: how long rank 0 waits for workers to exit and say why


class ParallelError(RuntimeError):
    """A data-parallel worker died, failed, or did not answer in time; the node cannot train on."""


class CollectiveError(RuntimeError):
    """An all-reduce or broadcast failed: a peer closed its connection (it died) or did not answer in time."""


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def rank_devices(spec: str) -> list[torch.device]:
    """The torch device of every rank for a `devices` spec, rank 0 first ([]: one process). Raises ConfigError."""
    return [torch.device(name) for name in parse_devices(spec, _visible_gpus)]


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def threads_per_rank(cfg: NodeConfig, world: int) -> int:
    """CPU threads per rank: `--threads` when set, else this machine's cores shared evenly among the ranks."""
    return cfg.threads if cfg.threads > 0 else max(1, (os.cpu_count() or 1) // world)


class Replica:
    """One rank's side of the group: averages gradients in the inner step and copies rank 0's state."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Any, rank: int, world: int,
                 timeout: float) -> None:
        self.model, self.optimizer, self.group, self.rank, self.world = model, optimizer, group, rank, world
        self.timeout = datetime.timedelta(seconds=timeout)
        self.parameters = list(model.parameters())

    def average(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """`inner_step`'s hook between backward and clipping: every rank's gradient becomes the mean over the
        ranks (one all-reduce of the flat gradient with the loss appended); returns the mean loss. The sum
        is the same bytes on every rank, so every rank clips and steps identically."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().reshape(1).float()])
        self._wait([self.group.allreduce([flat])])
        flat /= self.world
        offset = 0
        for grad in grads:
            count = grad.numel()
            grad.copy_(flat[offset : offset + count].view_as(grad))
            offset += count
        return flat[-1].to(loss.dtype)

    def adam_steps(self) -> list[int | None]:
        """AdamW's step count per parameter (None: no state yet), what workers need to mirror rank 0's state."""
        steps: list[int | None] = []
        for parameter in self.parameters:
            state = self.optimizer.state.get(parameter, {})
            steps.append(int(state["step"]) if "exp_avg" in state else None)
        return steps

    @torch.no_grad()
    def broadcast_state(self, steps: Sequence[int | None]) -> None:
        """Rank 0's parameters and AdamW moments into every replica, in place (rank 0 sends, the others receive).
        `steps` is rank 0's `adam_steps()`; a worker first makes its optimizer state the same shape."""
        tensors = list(self.parameters)
        for parameter, step in zip(self.parameters, steps):
            if step is None:
                if self.rank:
                    self.optimizer.state.pop(parameter, None)
                continue
            state = self.optimizer.state[parameter]
            if self.rank:
                if "exp_avg" not in state:  # a worker that has not stepped yet (rank 0 has, or restored a checkpoint)
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["step"] = torch.tensor(float(step))  # AdamW's own form (a float32 CPU scalar), as a replay's
            tensors += [state["exp_avg"], state["exp_avg_sq"]]
        buffers = [t.detach() if t.is_contiguous() else t.detach().contiguous() for t in tensors]
        self._wait([self.group.broadcast(buffer, 0) for buffer in buffers])
        for tensor, buffer in zip(tensors, buffers):
            if buffer.data_ptr() != tensor.data_ptr():
                tensor.copy_(buffer)

    def _wait(self, works: Iterable[Any]) -> None:
        try:
            for work in works:
                work.wait(self.timeout)
        except RuntimeError as error:  # DistBackendError and friends: which peer and why is for rank 0 to find out
            raise CollectiveError(str(error)[:300]) from error


def _make_group(devices: Sequence[torch.device], store: dist.Store, rank: int, timeout: float) -> Any:
    """The process group of the node's ranks: NCCL when they are GPUs, gloo on CPU (bound to 127.0.0.1)."""
    world = len(devices)
    if devices[0].type == "cuda":
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a stuck peer: an exception after timeout, no abort
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(store, rank, world, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, world, options)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its replica and join the group (pickled to it by spawn)."""

    cfg: NodeConfig
    vocab_size: int
    devices: tuple[str, ...]
    rank: int
    port: int
    parent_pid: int
    timeout: float
    start_timeout: float


@dataclass
class WorkerHandle:
    rank: int
    device: str
    process: BaseProcess
    conn: Connection


def build_replica_model(cfg: NodeConfig, vocab_size: int,
                        device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A worker's model and AdamW, built by the very function that builds the node's (the weights come from rank 0)."""
    from node.train.trainer import training_model  # (the trainer imports this module)

    return training_model(cfg, vocab_size, device, load_weights=False)


def _worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Rank 1..N-1: build the replica, join the group, then obey rank 0 until it stops, dies or a collective fails."""
    # A terminal's Ctrl-C (and a TERM to the process group) is the node's to handle: it stops its workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _serve(spec, conn)
        os._exit(0)  # stopped (or orphaned): skip the interpreter's teardown of the process group
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(0)  # rank 0 is gone: nothing to report to, nobody to wait for
    except BaseException as error:  # noqa: BLE001 - whatever failed, rank 0 gets the reason before we exit
        try:
            conn.send(("error", f"{type(error).__name__}: {error}"[:500], traceback.format_exc(limit=8)))
        except OSError:
            pass  # rank 0 is gone too
        os._exit(1)  # no interpreter teardown: a half-dead process group must not hang the exit


def _serve(spec: WorkerSpec, conn: Connection) -> None:
    from node.train.trainer import autocast_dtype, inner_step  # (the trainer imports this module)

    devices = [torch.device(name) for name in spec.devices]
    device = devices[spec.rank]
    torch.set_num_threads(threads_per_rank(spec.cfg, len(devices)))
    model, optimizer = build_replica_model(spec.cfg, spec.vocab_size, device)
    autocast = autocast_dtype(device)
    store = dist.TCPStore("127.0.0.1", spec.port, len(devices), False,
                          timeout=datetime.timedelta(seconds=spec.start_timeout))
    conn.send(("ready",))
    group = _make_group(devices, store, spec.rank, spec.timeout)
    replica = Replica(model, optimizer, group, spec.rank, len(devices), spec.timeout)
    model.train()
    while True:
        if not conn.poll(PARENT_POLL_SECONDS):
            if os.getppid() != spec.parent_pid:
                return  # rank 0 died and its pipe end outlived it (a grandchild holding it): leave all the same
            continue
        command, *args = conn.recv()
        if command == "step":
            lr, inputs, targets = args
            inner_step(model, optimizer, torch.from_numpy(inputs), torch.from_numpy(targets), lr,
                       spec.cfg.grad_clip, spec.cfg.micro_batches, autocast, average=replica.average)
        elif command == "sync":
            replica.broadcast_state(args[0])
        elif command == "state":
            conn.send(("state", *_flat_state(replica)))
        elif command == "stop":
            return
        else:
            raise ValueError(f"unknown command {command!r} from rank 0")


def _flat_state(replica: Replica) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parameters, AdamW exp_avg, exp_avg_sq) flat float32 in parameter order (zeros where no state)."""
    flat = []
    for key in (None, "exp_avg", "exp_avg_sq"):
        parts = []
        for parameter in replica.parameters:
            tensor = parameter if key is None else replica.optimizer.state.get(parameter, {}).get(key)
            parts.append((torch.zeros_like(parameter) if tensor is None else tensor).detach().reshape(-1).float().cpu())
        flat.append(torch.cat(parts).numpy())
    return flat[0], flat[1], flat[2]


class DataParallel:
    """Rank 0's side: starts the workers, keeps them in step with the node's model, stops them.

    Use from one thread (the trainer's). After any failure it is unusable: every call raises the same
    ParallelError, and the workers are gone.
    """

    def __init__(self, cfg: NodeConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 devices: Sequence[torch.device], vocab_size: int = 256, timeout: float = COLLECTIVE_TIMEOUT,
                 start_timeout: float = START_TIMEOUT) -> None:
        if len(devices) < 2:
            raise ValueError("data parallelism needs at least two devices")
        self.cfg, self.world, self.timeout = cfg, len(devices), timeout
        self.devices = [str(device) for device in devices]
        self.failed: ParallelError | None = None
        self.workers: list[WorkerHandle] = []
        if devices[0].type == "cpu":
            torch.set_num_threads(threads_per_rank(cfg, self.world))
        else:
            torch.cuda.set_device(devices[0])  # NCCL binds rank 0's communicator to the current device
        # port 0: the OS picks a free port; the workers learn it from their spec
        store = dist.TCPStore("127.0.0.1", 0, self.world, True, timeout=datetime.timedelta(seconds=start_timeout),
                              wait_for_workers=False)
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads (hivemind sets fork)
        try:
            for rank in range(1, self.world):
                ours, theirs = context.Pipe(duplex=True)
                spec = WorkerSpec(cfg, vocab_size, tuple(self.devices), rank, store.port, os.getpid(), timeout,
                                  start_timeout)
                # daemon: multiprocessing kills the workers if this process exits without closing them
                process = context.Process(target=_worker_main, args=(spec, theirs), name=f"gossiptrain-rank{rank}",
                                          daemon=True)
                process.start()
                theirs.close()
                self.workers.append(WorkerHandle(rank, self.devices[rank], process, ours))
            self._await_ready(start_timeout)
            group = _make_group(list(devices), store, 0, timeout)
        except BaseException as error:
            self.kill()
            if isinstance(error, ParallelError) or not isinstance(error, Exception):
                raise
            raise ParallelError(f"data-parallel start failed: {error}") from error
        self.store = store  # the group's rendezvous: kept alive as long as the group
        self.replica = Replica(model, optimizer, group, 0, self.world, timeout)
        logger.info("data-parallel: %d ranks on %s (workers: pids %s)", self.world, ", ".join(self.devices),
                    ", ".join(str(w.process.pid) for w in self.workers))

    def _await_ready(self, start_timeout: float) -> None:
        """Every worker has built its model and reached the store, or a ParallelError says which did not."""
        deadline = time.monotonic() + start_timeout
        waiting = {worker.conn: worker for worker in self.workers}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ranks = ", ".join(str(w.rank) for w in waiting.values())
                raise ParallelError(f"data-parallel worker rank(s) {ranks} not ready within {start_timeout:.0f}s")
            sentinels = {worker.process.sentinel: worker for worker in waiting.values()}
            for ready in wait([*waiting, *sentinels], remaining):
                worker = waiting.get(ready) or sentinels[ready]
                message = self._receive(worker)
                if message is not None and message[0] == "ready":
                    del waiting[worker.conn]
                else:
                    raise ParallelError(f"data-parallel worker failed to start: {self._describe(worker, message)}")

    # ------------------------------------------------------------------ used by the trainer
    def sync_state(self) -> None:
        """Copy rank 0's parameters and AdamW state to every worker (before a round's first step)."""
        steps = self.replica.adam_steps()
        self._run(lambda: self.replica.broadcast_state(steps), ("sync", steps))

    def inner_step(self, sampler: BatchSource, lr: float, autocast: torch.dtype | None = None) -> torch.Tensor:
        """One data-parallel inner step: N batches from `sampler` (batch r to rank r); returns the mean loss."""
        from node.train.trainer import inner_step

        batches = [sampler.next_batch() for _ in range(self.world)]
        replica = self.replica
        commands = [("step", lr, inputs.numpy(), targets.numpy()) for inputs, targets in batches[1:]]
        inputs, targets = batches[0]
        return self._run(lambda: inner_step(replica.model, replica.optimizer, inputs, targets, lr, self.cfg.grad_clip,
                                            self.cfg.micro_batches, autocast, average=replica.average), *commands,
                         per_worker=True)

    def worker_state(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A worker's (parameters, exp_avg, exp_avg_sq), flat float32 CPU: to check that replicas agree."""
        self._check_usable()
        worker = self.workers[rank - 1]
        self._send(worker, ("state",))
        if not worker.conn.poll(self.timeout):
            raise self._fail(TimeoutError(f"no state from rank {rank} within {self.timeout:.0f}s"))
        message = self._receive(worker)
        if message is None or message[0] != "state":
            raise self._fail(RuntimeError(self._describe(worker, message)))
        return tuple(torch.from_numpy(array) for array in message[1:])  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the workers (bounded: one that does not exit in time is killed)."""
        for worker in self.workers:
            if worker.process.is_alive():
                try:
                    worker.conn.send(("stop",))
                except OSError:
                    pass  # already gone
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        self.kill()
        if self.failed is None:
            self.failed = ParallelError("data-parallel workers were stopped")

    def kill(self) -> None:
        """Kill every worker at once (safe from any thread; after a failure, and at a forced exit)."""
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.kill()
        for worker in self.workers:
            worker.process.join(STOP_TIMEOUT)
            worker.conn.close()

    # ------------------------------------------------------------------ failure handling
    def _run(self, local: Any, *commands: tuple, per_worker: bool = False) -> Any:
        """Send the workers their command (one each when `per_worker`, else the same to all), run rank 0's
        part, and turn any failure into a ParallelError (after which the workers are gone)."""
        self._check_usable()
        for index, worker in enumerate(self.workers):
            self._send(worker, commands[index] if per_worker else commands[0])
        try:
            return local()
        except ParallelError:
            raise
        except BaseException as error:
            # a failed collective (a worker died, or hung past the timeout), or rank 0's own failure mid-step:
            # either way the workers are out of step with rank 0 now
            failure = self._fail(error)
            if not isinstance(error, Exception):
                raise  # KeyboardInterrupt, SystemExit: as they were (the workers are gone all the same)
            raise failure from error

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise self.failed
        for worker in self.workers:
            if not worker.process.is_alive():
                raise self._fail(RuntimeError("worker exited between steps"))

    def _send(self, worker: WorkerHandle, command: tuple) -> None:
        try:
            worker.conn.send(command)
        except OSError as error:
            raise self._fail(error) from error

    def _fail(self, error: BaseException) -> ParallelError:
        """Collect why (which worker exited, with which code or error), kill the rest, remember the failure."""
        deadline = time.monotonic() + DIAGNOSE_SECONDS
        reasons = []
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            message = self._receive(worker) if not worker.conn.closed and worker.conn.poll(0) else None
            if worker.process.exitcode is not None or message is not None:
                reasons.append(self._describe(worker, message))
        if not reasons and isinstance(error, CollectiveError):  # nobody exited: someone is stuck (or stopped)
            reasons = [f"{self._describe(worker, None)} within {self.timeout:.0f}s" for worker in self.workers]
        if not reasons:  # rank 0's own failure mid-step (out of memory, say): the workers wait on it now
            reasons.append(f"rank 0 failed: {type(error).__name__}: {error}"[:400])
        self.kill()
        self.failed = ParallelError("data-parallel training stopped: " + "; ".join(reasons))
        return self.failed

    @staticmethod
    def _receive(worker: WorkerHandle) -> tuple | None:
        try:
            return worker.conn.recv()
        except (EOFError, OSError):
            return None

    @staticmethod
    def _describe(worker: WorkerHandle, message: tuple | None) -> str:
        what = f"worker rank {worker.rank} ({worker.device}, pid {worker.process.pid})"
        worker.process.join(0.5 if message is None else 0)
        code = worker.process.exitcode
        if code is not None and code < 0:
            exited = f"was killed by {signal.Signals(-code).name}"
        elif code is not None:
            exited = f"exited with code {code}"
        else:
            exited = "is alive but did not answer"
        detail = f": {message[1]}" if message is not None and message[0] == "error" else ""
        if detail and message is not None:
            logger.error("%s failed:\n%s", what, message[2])
        return f"{what} {exited}{detail}"
