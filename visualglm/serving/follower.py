"""Serving under tensor parallelism: rank 0 leads, every other rank follows its batches in lockstep.

Rank 0 runs the HTTP server and the :class:`~visualglm.serving.worker.Worker`; the worker's thread is the
only one of rank 0 that talks to the process group, through a :class:`Leader`. For each batch it
broadcasts the rows (prompt ids, per-row params, seeds: small, pickled) and then each row's image
embeddings as tensors; every rank then makes the same ``batch_steps`` call, whose forward passes hold the
model's collectives. After each step rank 0 broadcasts which rows it ended (client gone, stop string,
error), so that every rank drops the same rows at the same step. The vision towers are replicated
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

import logging
import signal
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from visualglm.serving.batch import Row, batch_steps

log = logging.getLogger("visualglm.serving")

HEARTBEAT_S = 60.0  # well under the process group's default 30-minute timeout
_BATCH, _HEARTBEAT, _STOP = "batch", "heartbeat", "stop"


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
        self._rows = 0
        self.closed = False

    def send_batch(self, rows: Sequence[Row], images: Sequence[torch.Tensor | None]) -> None:
        """Send a batch: rows, then each image's embeddings ``[1, image_length, hidden]`` (in row order)."""
        specs = [None if image is None else (tuple(image.shape), str(image.dtype)) for image in images]
        dist.broadcast_object_list([(_BATCH, list(rows), specs)], src=0)
        for image in images:
            if image is not None:
                dist.broadcast(image.to(self.device).contiguous(), src=0)
        self._rows = len(rows)

    def share_ended(self, ended: Sequence[int]) -> list[int]:
        """Broadcast this step's ended rows (a ``[B]`` 0/1 mask) and return them."""
        mask = torch.zeros(self._rows, dtype=torch.uint8, device=self.device)
        if ended:
            mask[list(ended)] = 1
        dist.broadcast(mask, src=0)
        return list(ended)

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


def _receive_batch(device: torch.device, rows: list[Row], specs: list[Any]
                   ) -> tuple[list[Row], list[torch.Tensor | None]]:
    images: list[torch.Tensor | None] = []
    for spec in specs:
        if spec is None:
            images.append(None)
            continue
        shape, dtype = spec
        image = torch.empty(shape, dtype=_dtype(dtype), device=device)
        dist.broadcast(image, src=0)
        images.append(image)
    return rows, images


def follow(model: nn.Module, device: torch.device) -> int:
    """Run every batch rank 0 sends, in lockstep, until it says stop; returns the number of batches run.

    Ctrl-C and SIGTERM are ignored here: the terminal (or torchrun) signals every rank, and a follower that
    left on its own would leave rank 0 stuck in a collective; rank 0 shuts down cleanly and then tells
    the followers to stop.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    batches = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        kind = box[0][0]
        if kind == _STOP:
            return batches
        if kind == _HEARTBEAT:
            continue
        rows, images = _receive_batch(device, *box[0][1:])

        def end_rows(count: int = len(rows)) -> list[int]:
            mask = torch.zeros(count, dtype=torch.uint8, device=device)
            dist.broadcast(mask, src=0)
            return mask.nonzero().flatten().tolist()

        batches += 1
        try:
            with torch.inference_mode():
                for _ in batch_steps(model, rows, images, end_rows):
                    pass
        except Exception:  # noqa: BLE001 - rank 0 hit the same error in the same collective and failed the batch
            log.exception("batch failed on this rank")
