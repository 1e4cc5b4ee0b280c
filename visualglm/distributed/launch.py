"""Running under torchrun: the process group, rank-0-only I/O, and relaunching a command on N processes.

Every rank runs the same program on the same inputs; only rank 0 talks to the user. Whatever rank 0 reads
(a line of stdin, an image) reaches the other ranks through ``rank0_call``, so they follow in lockstep and
the collectives inside the model's forward line up. Sampling is identical on every rank because the
logits are gathered to the same values everywhere and every rank seeds its generator with the seed rank 0
chose (``shared_seed``).
"""

from __future__ import annotations

import atexit
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the group: ``device`` is where its shard of the model lives."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_context: DistributedContext | None = None  # the first init_from_env's answer


def launched_by_torchrun() -> bool:
    """True when torchrun (torch.distributed.run) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    """True when a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: str | torch.device = "cpu", quiet_workers: bool = True) -> DistributedContext | None:
    """Join the process group torchrun describes in the environment (None when not launched by it).

    The backend is NCCL for CUDA (each rank takes ``cuda:LOCAL_RANK``) and gloo for CPU. With
    ``quiet_workers`` ranks other than 0 write their stdout and stderr to /dev/null (unless
    ``VISUALGLM_DEBUG`` is set), so the user sees one answer, one progress bar and one error message.
    """
    global _context
    if not launched_by_torchrun():
        return None
    if _context is not None:
        return _context
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_shutdown)
    context = DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), device)
    if quiet_workers and not context.is_main and not os.environ.get("VISUALGLM_DEBUG"):
        devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        sys.stdout = sys.stderr = devnull
    _context = context
    return context


def _shutdown() -> None:
    if dist.is_initialized():
        # Leave together: a rank that tears its connections down while another still uses them can make
        # the other abort ("terminate called without an active exception").
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already failed; torchrun reports that one
            pass
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``; a torchrun rank leaves the process group with the others first and then
    exits without Python's finalization. Gloo's worker threads may still be releasing the last collective's
    tensors, which takes the GIL: during finalization that kills the thread and aborts the process
    ("terminate called without an active exception"; seen in about one run in ten on a 2-vCPU machine)."""
    if not dist.is_initialized():
        sys.exit(code)
    _shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to write
            pass
    os._exit(code)


def rank0_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result or raises its exception.

    Without a process group this is a plain call. The result must be picklable (a line of text, a PIL image).
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def shared_seed(seed: int | None) -> int | None:
    """``seed`` if given; under a process group a random seed drawn by rank 0 and shared with every rank,
    so that sampling picks the same tokens everywhere (None when not distributed: a fresh seed per run)."""
    if seed is not None or not is_distributed():
        return seed
    return rank0_call(random.SystemRandom().randrange, 2**63)


def strip_tp_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--tp N`` / ``--tp=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--tp":
            skip = True
        elif not arg.startswith("--tp="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m visualglm ARGV`` (without ``--tp``) on ``nproc`` local processes through
    torch.distributed.run and return its exit status. Each process gets an equal share of the CPU threads
    unless OMP_NUM_THREADS is set."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "visualglm", *strip_tp_flag(argv)]
    return subprocess.call(command, env=env)


def relaunch_forwarding_signals(nproc: int, argv: Sequence[str]) -> int:
    """``relaunch`` for a long-running command (a server), stopped by Ctrl-C, SIGTERM or SIGHUP sent to
    this process. torch.distributed.run runs in a session of its own, so a terminal's Ctrl-C reaches this
    process only; the first signal goes to the ranks themselves (rank 0 shuts its server down and tells the
    others to stop), after which torch.distributed.run sees them end and exits quietly (signalled itself,
    it aborts with a traceback). A further signal goes to torch.distributed.run, which then stops the ranks
    by force. Returns torch.distributed.run's exit status."""
    import signal

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "visualglm", *strip_tp_flag(argv)]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        targets = (_child_pids(process.pid) or [process.pid]) if not received else [process.pid]
        received.append(signum)
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc; empty where it is not available)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in children.split()]
