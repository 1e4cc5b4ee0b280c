"""Serving under tensor parallelism: rank 0 leads, every other rank follows its engine steps in lockstep.

Rank 0 runs the HTTP server and the :class:`~visualglm.serving.worker.Worker`; the worker's thread is the
only one of rank 0 that talks to the process group, through a :class:`Leader`. Before each engine step it
broadcasts the engine's shape, the step's newcomers (prompt ids, params, seeds, image keys: small, pickled)
and the requests it ended (client gone, stop string, error), then each newcomer's image embeddings as
tensors; every rank then makes the same ``submit``/``end``/``step`` calls on its own
:class:`~visualglm.generation.continuous.ContinuousEngine`, which is deterministic in them, so the ranks run
the same schedule and their forward passes hold the same collectives. The vision towers are replicated
(``visualglm/distributed/tp.py`` splits only the language model), so only rank 0 encodes images, and the
others receive the embeddings instead of the pictures.

Ranks > 0 run :func:`follow` until rank 0 says stop (its worker stopping: Ctrl-C or SIGTERM ends
uvicorn, which stops the worker). While idle, rank 0 sends a heartbeat every :data:`HEARTBEAT_S`
seconds: a follower waits for the next batch inside a broadcast, and a collective that waits longer than
the process group's timeout (30 minutes by default) fails. A heartbeat keeps that timeout meaningful
instead of stretching it to hours, which would also delay noticing a rank 0 that really died.

Lockstep assumes that a batch fails on every rank or on none (the same shapes meet the same errors). A
failure on one rank only (say, out of memory on one GPU) leaves the ranks out of step: rank 0's clients
get 500s, and the server has to be restarted.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from visualglm.generation.continuous import EngineRequest

log = logging.getLogger("visualglm.serving")

HEARTBEAT_S = 60.0  # well under the process group's default 30-minute timeout
_STEP, _HEARTBEAT, _STOP = "step", "heartbeat", "stop"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class Leader:
    """Rank 0's side of the channel (used by the worker thread only, so that collectives stay ordered).
    ``device`` is where this rank's tensors for the collectives live (NCCL needs CUDA tensors)."""

    heartbeat_s = HEARTBEAT_S

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.closed = False

    def send_step(self, shape: tuple[int, ...], newcomers: Sequence[tuple[EngineRequest, torch.Tensor | None]],
                  ended: Sequence[Any]) -> None:
        """Send one step's inputs: the engine's shape, the newcomers (without their image tensors) and the
        ended request ids; then each newcomer's image embeddings ``[1, image_length, hidden]``."""
        requests = [dataclasses.replace(request, image_embeds=None) for request, _ in newcomers]
        specs = [None if image is None else (tuple(image.shape), str(image.dtype)) for _, image in newcomers]
        dist.broadcast_object_list([(_STEP, shape, requests, specs, list(ended))], src=0)
        for _, image in newcomers:
            if image is not None:
                dist.broadcast(image.to(self.device).contiguous(), src=0)

    def heartbeat(self) -> None:
        dist.broadcast_object_list([(_HEARTBEAT,)], src=0)

    def close(self) -> None:
        """Tell the followers to leave their loop (once; a follower already gone is only logged)."""
        if self.closed:
            return
        self.closed = True
        try:
            dist.broadcast_object_list([(_STOP,)], src=0)
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.warning("could not tell the other ranks to stop", exc_info=True)


def _receive_images(device: torch.device, requests: list[EngineRequest], specs: list[Any]) -> None:
    for request, spec in zip(requests, specs, strict=True):
        if spec is not None:
            shape, dtype = spec
            request.image_embeds = torch.empty(shape, dtype=_dtype(dtype), device=device)
            dist.broadcast(request.image_embeds, src=0)


def follow(model: nn.Module, device: torch.device) -> int:
    """Make every engine call rank 0 makes, in lockstep, until it says stop; returns the steps run.

    Ctrl-C and SIGTERM are ignored here: the terminal (or torchrun) signals every rank, and a follower that
    left on its own would leave rank 0 stuck in a collective; rank 0 shuts down cleanly and then tells
    the followers to stop.
    """
    from visualglm.serving.worker import make_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    steps = 0
    engine, engine_shape = None, None
    try:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            kind = box[0][0]
            if kind == _STOP:
                return steps
            if kind == _HEARTBEAT:
                continue
            shape, requests, specs, ended = box[0][1:]
            _receive_images(device, requests, specs)
            if engine is None or shape != engine_shape:
                if engine is not None:
                    engine.close()
                engine, engine_shape = make_engine(model, shape), shape
            for request in requests:
                engine.submit(request)
            for key in ended:
                engine.end(key)
            steps += 1
            try:
                with torch.inference_mode():
                    engine.step()
            except Exception:  # noqa: BLE001 - rank 0 hit the same error in the same collective
                log.exception("engine step failed on this rank")
                engine.close()
                engine = None  # rank 0 starts a fresh engine too
    finally:
        if engine is not None:
            engine.close()
