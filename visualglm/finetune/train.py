"""The fine-tuning loop: LoRA, QLoRA or P-tuning v2 on any of the three model families.

AdamW on the adapter parameters only, linear warmup then cosine decay, gradient accumulation and
clipping, optional activation checkpointing and bf16 autocast, periodic evaluation, ``metrics.jsonl`` +
``loss.png``, a tqdm bar. Launched with ``torchrun --nproc-per-node N`` it runs data-parallel (DDP; gloo
on CPU, NCCL on CUDA).

Determinism, which makes resume exact and world sizes comparable:
- the sample order is a function of (seed, step): epoch e is ``randperm(n)`` seeded with ``seed + e``, and
  step s takes the next ``batch_size`` samples of that stream; rank r gets its r-th share;
- the loss is a sum over the global batch's label tokens divided by their total count (known to every rank
  from the data), so how the batch is split into ranks and micro-batches does not change the gradient;
- a checkpoint (``checkpoints/step-N``, written to a temporary folder then renamed) holds the adapter,
  the optimizer, the scheduler and every rank's RNG state; resuming from it replays the same losses.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from visualglm.config import image_size
from visualglm.finetune.data import IGNORE_INDEX, Batch, Example, collate, count_label_tokens
from visualglm.finetune.plot import plot_metrics_file
from visualglm.finetune.state import (
    find_latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    save_training_state,
    write_final_adapter,
)
from visualglm.models.interface import is_multimodal
from visualglm.peft import LoraConfig, count_parameters, inject_lora, inject_ptuning

METHODS = ("lora", "qlora", "ptuning")


@dataclass
class TrainConfig:
    """Options of a run. Defaults follow VisualGLM-6B's LoRA script (lr 1e-4, batch 4, 2% warmup, cosine)."""

    method: str = "lora"
    steps: int | None = None  # optimizer steps; or
    epochs: float | None = None  # passes over the data (steps = ceil(epochs * n / batch_size))
    batch_size: int = 4  # samples per optimizer step, all ranks together
    micro_batch_size: int | None = None  # samples per forward on one rank (default: batch_size / world)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.02  # fraction of the steps (the reference's --warmup .02), or steps when >= 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    activation_checkpointing: bool = False
    bf16: bool = False  # bf16 autocast for the forward
    eval_every: int = 0  # steps; 0 = only at the end (when there is eval data)
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    seed: int = 1234
    # LoRA / QLoRA
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | None = None
    layer_range: list[int] | None = None
    quant_bits: int = 4  # QLoRA base precision
    # P-tuning v2
    pre_seq_len: int = 128
    prefix_projection: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def total_steps(self, num_examples: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * num_examples / self.batch_size))
        raise ValueError("give the number of steps or epochs")

    def validate(self) -> TrainConfig:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        if (self.steps is not None and self.steps <= 0) or (self.epochs is not None and self.epochs <= 0):
            raise ValueError("steps / epochs must be positive")
        if self.batch_size <= 0 or (self.micro_batch_size is not None and self.micro_batch_size <= 0):
            raise ValueError("batch sizes must be positive")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        return self


# ------------------------------------------------------------------------------------------- the model
def prepare_model(model: nn.Module, config: TrainConfig) -> list[str]:
    """Quantize the base (QLoRA) and add the adapter in place; returns what got an adapter."""
    torch.manual_seed(config.seed)  # adapter initialisation is part of the run's determinism
    if config.method == "ptuning":
        inject_ptuning(model, config.pre_seq_len, config.prefix_projection)
        return ["transformer.prefix_encoder"]
    if config.method == "qlora":
        from visualglm.checkpoint.load import apply_quantization

        apply_quantization(model, config.quant_bits)
    lora = LoraConfig.for_family(model, rank=config.lora_rank, alpha=config.lora_alpha,
                                 dropout=config.lora_dropout, layer_range=config.layer_range,
                                 target_modules=tuple(config.target_modules) if config.target_modules else None)
    return inject_lora(model, lora)


def output_layer(model: nn.Module) -> nn.Module:
    """The vocabulary projection (ChatGLM ``lm_head``, GLM-4 ``transformer.output_layer``)."""
    head = getattr(model, "lm_head", None)
    return head if head is not None else model.transformer.output_layer


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder block in the backward instead of keeping its activations. Done by setting the
    blocks' ``forward`` (module names, and so adapter keys, do not change); returns the blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    names = {name.rpartition(".")[0] for name, module in model.named_modules()
             if any(module is a for a in model.attention_modules())}
    for name in names:
        block = model.get_submodule(name)
        forward = block.forward

        def wrapped(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped
    return len(names)


class LossModule(nn.Module):
    """``forward(batch)`` -> (sum of token cross-entropies, label tokens). Wraps the model so DDP sees
    one forward per micro-batch. Image embeddings of a frozen vision tower are cached per image file."""

    def __init__(self, model: nn.Module, bf16: bool = False, cache_images: bool = True) -> None:
        super().__init__()
        self.model = model
        self.bf16 = bf16
        self.cache_images = cache_images
        self._image_cache: dict[Path, torch.Tensor] = {}
        self.max_cached_images = 4096

    def vision_trainable(self) -> bool:
        return any(p.requires_grad for n, p in self.model.named_parameters()
                   if n.startswith(("image_encoder.", "transformer.vision.")))

    def image_embeds(self, batch: Batch) -> torch.Tensor | None:
        """``[B, N, hidden]`` (zeros for rows without an image), or None for a text-only batch."""
        if not batch.image_rows:
            return None
        model = self.model
        device = model.get_input_embeddings().weight.device
        frozen = not self.vision_trainable()
        paths = [batch.images[r] for r in batch.image_rows]
        if frozen and self.cache_images and all(p in self._image_cache for p in paths):
            encoded = torch.stack([self._image_cache[p] for p in paths]).to(device)
        else:
            if batch.pixel_values is None:
                raise RuntimeError("batch without pixels and an image cache miss")
            with torch.set_grad_enabled(not frozen and torch.is_grad_enabled()):
                encoded = model.encode_images(batch.pixel_values.to(device))
            if frozen and self.cache_images and len(self._image_cache) < self.max_cached_images:
                for p, e in zip(paths, encoded, strict=True):
                    self._image_cache[p] = e.detach().cpu()
        full = torch.zeros(batch.input_ids.shape[0], *encoded.shape[1:], dtype=encoded.dtype, device=device)
        full[batch.image_rows] = encoded
        return full

    def cached(self, batch_images: list[Path | None]) -> bool:
        return self.cache_images and not self.vision_trainable() and all(
            p is None or p in self._image_cache for p in batch_images)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        device = model.get_input_embeddings().weight.device
        ids, labels = batch.input_ids.to(device), batch.labels.to(device)
        positions, mask = model.prompt_inputs(ids)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            images = self.image_embeds(batch)
            embeds = None if images is None else model.embed_with_images(ids, images, batch.image_starts)
            hidden = model.hidden_states(None if embeds is not None else ids, positions, mask,
                                         inputs_embeds=embeds)
            targets = labels[:, 1:]
            selected = targets != IGNORE_INDEX
            # Only the answer positions go through the (vocabulary-sized) output layer.
            logits = output_layer(model)(hidden[:, :-1][selected])
        loss = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
        return loss, selected.sum()


# --------------------------------------------------------------------------------------- data order
def sample_order(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """The example indices of optimizer step ``step`` (0-based): a stream of per-epoch permutations."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out += perm[offset: offset + batch_size - len(out)]
    return out


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup to the base lr, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ------------------------------------------------------------------------------------------- the loop
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _all_reduce(values: list[float]) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(loss_module: LossModule, examples: list[Example], pad_id: int, size, micro_batch: int) -> float:
    """Token-weighted mean loss over ``examples`` (split across ranks)."""
    rank, world = _world()
    was_training = loss_module.training
    loss_module.eval()
    total = count = 0.0
    mine = examples[rank::world]
    for start in range(0, len(mine), micro_batch):
        part = mine[start: start + micro_batch]
        batch = collate(part, pad_id, size, load_pixels=not loss_module.cached([e.image for e in part]))
        loss, tokens = loss_module(batch)
        total, count = total + float(loss), count + float(tokens)
    total, count = _all_reduce([total, count])
    loss_module.train(was_training)
    return total / max(count, 1.0)


def train(model: nn.Module, tokenizer, train_examples: list[Example], out_dir: str | Path,
          config: TrainConfig, *, eval_examples: list[Example] | None = None, resume: bool = False,
          base_model: str | None = None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Fine-tune ``model`` (adapters are added here) and write the adapter to ``out_dir``.

    ``out_dir`` receives the final adapter (peft layout, usable with ``--adapter``), ``checkpoints/``,
    ``metrics.jsonl`` and ``loss.png``. ``resume`` continues from the latest checkpoint. ``stop_after``
    ends the run after that many total steps, with a checkpoint (what an interrupted run leaves behind).
    Returns a summary dict (steps, last loss, eval loss, trainable parameters, seconds).
    """
    config.validate()
    out_dir = Path(out_dir)
    rank, world = _world()
    if not train_examples:
        raise ValueError("no training examples")
    total_steps = config.total_steps(len(train_examples))
    micro = config.micro_batch_size or max(1, config.batch_size // world)
    if config.batch_size % (micro * world):
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of micro_batch_size {micro} x "
                         f"{world} process(es)")
    accumulation = config.batch_size // (micro * world)

    adapted = prepare_model(model, config)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_module = LossModule(model, bf16=config.bf16)
    engine: nn.Module = loss_module
    if world > 1:
        # Every rank built the same model and seeded the adapter alike: no initial broadcast (it would also
        # write into read-only memory-mapped base weights).
        engine = nn.parallel.DistributedDataParallel(loss_module, broadcast_buffers=False, init_sync=False)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(warmup, 1) if warmup else 0, total_steps))
    pad_id = model.config.pad_token_id
    size = image_size(model.config) if is_multimodal(model) else None
    metrics_path = out_dir / "metrics.jsonl"
    metadata = {"method": config.method, "quant_bits": config.quant_bits if config.method == "qlora" else None,
                "train_config": asdict(config)}

    step = 0
    if resume:
        checkpoint = find_latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
        step = load_training_state(checkpoint, model, optimizer, scheduler, rank, world)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, step)
    label_tokens = [count_label_tokens([e]) for e in train_examples]
    start_time = time.time()
    bar = tqdm(total=total_steps, initial=step, disable=not progress or rank != 0, desc=f"{config.method}",
               unit="step")
    last_loss = math.nan
    eval_loss = None
    model.train()
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    while step < end:
        order = sample_order(step, config.batch_size, len(train_examples), config.seed)
        global_tokens = max(1, sum(label_tokens[i] for i in order))
        share = order[rank * micro * accumulation: (rank + 1) * micro * accumulation]
        step_loss = 0.0
        for k in range(accumulation):
            part = [train_examples[i] for i in share[k * micro: (k + 1) * micro]]
            batch = collate(part, pad_id, size, load_pixels=not loss_module.cached([e.image for e in part]))
            sync = k == accumulation - 1 or world == 1
            context = engine.no_sync() if (world > 1 and not sync) else _null()
            with context:
                loss_sum, _ = engine(batch)
                # DDP averages gradients over ranks: scale by world so the result is sum / global tokens.
                (loss_sum * (world / global_tokens)).backward()
            step_loss += float(loss_sum.detach())
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm > 0
                     else _grad_norm(params))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        last_loss = _all_reduce([step_loss])[0] / global_tokens
        record = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": global_tokens, "elapsed_s": round(time.time() - start_time, 3)}
        if eval_examples and (step == total_steps or (config.eval_every and step % config.eval_every == 0)):
            eval_loss = evaluate(loss_module, eval_examples, pad_id, size, micro)
            record["eval_loss"] = eval_loss
        if rank == 0:
            with metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        if (config.save_every and step % config.save_every == 0) or step == end:
            save_training_state(out_dir, step, model, optimizer, scheduler, rank, world, base_model, metadata)
            if rank == 0:
                prune_checkpoints(out_dir, config.keep_checkpoints)
    bar.close()
    if rank == 0:
        if step == total_steps:
            write_final_adapter(out_dir, model, base_model, metadata)
        plot_metrics_file(metrics_path, out_dir / "loss.png")
    return {"steps": step, "total_steps": total_steps, "loss": last_loss, "eval_loss": eval_loss,
            "trainable_parameters": trainable, "parameters": total, "adapted": len(adapted),
            "seconds": time.time() - start_time, "accumulation": accumulation, "world_size": world}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (logged by an interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
