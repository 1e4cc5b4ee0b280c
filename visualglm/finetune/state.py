"""Training checkpoints: written atomically, complete enough for an exact resume.

``<out>/checkpoints/step-N/`` holds the adapter in peft's layout (usable with ``--adapter`` as is) and
``trainer_state.pt``: every trainable tensor by name (P-tuning's projection weights too, which the peft file
folds into one table), the optimizer and scheduler states, each rank's RNG state and the step (the step
alone fixes the data position, see ``train.sample_order``). The folder is staged under a temporary name
and renamed when complete, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from visualglm.checkpoint.staging import staged_directory
from visualglm.peft import save_adapter

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _gather(obj: Any, rank: int, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world if rank == 0 else None  # type: ignore[assignment]
    dist.gather_object(obj, gathered, dst=0)
    return gathered if rank == 0 else []


def save_training_state(out_dir: Path, step: int, model: nn.Module, optimizer, scheduler, rank: int,
                        world: int, base_model: str | None, metadata: dict) -> Path | None:
    """Write ``checkpoints/step-<step>`` (rank 0 writes; every rank contributes its RNG state)."""
    rng = _gather(_rng_state(), rank, world)
    target = Path(out_dir) / "checkpoints" / f"step-{step}"
    if rank == 0:
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = {"step": step, "world_size": world, "trainable": trainable, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng}
        with staged_directory(target) as staging:
            save_adapter(model, staging, base_model=base_model, metadata={**metadata, "step": step})
            torch.save(state, staging / STATE_FILE)
    if world > 1:
        dist.barrier()
    return target if rank == 0 else None


def find_latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (staging folders are ignored)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def load_training_state(checkpoint: Path, model: nn.Module, optimizer, scheduler, rank: int, world: int) -> int:
    """Restore adapter weights, optimizer, scheduler and this rank's RNG; returns the step reached."""
    try:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"{checkpoint / STATE_FILE}: cannot read the training state ({exc})") from None
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(state["trainable"]) != trainable:
        missing, extra = sorted(trainable - set(state["trainable"])), sorted(set(state["trainable"]) - trainable)
        raise RuntimeError(f"{checkpoint}: its adapter does not match this run's (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}); resume with the same method and options")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] == world:
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        warnings.warn(f"{checkpoint} was written by {state['world_size']} process(es), this run has {world}: "
                      "random states (dropout) are not restored", stacklevel=2)
    return int(state["step"])


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    folder = Path(out_dir) / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def write_final_adapter(out_dir: Path, model: nn.Module, base_model: str | None, metadata: dict) -> None:
    """The adapter files at the top of ``out_dir``, each replaced atomically (write aside, then rename)."""
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out_dir))
    try:
        save_adapter(model, staging, base_model=base_model, metadata=metadata)
        for path in staging.iterdir():
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
