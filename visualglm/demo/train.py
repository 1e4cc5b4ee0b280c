"""``visualglm demo train``: train the shipped demo model from scratch on easy-VQA's train split.

Recipe (all seeded): a SentencePiece vocabulary on the data's text; the VisualGLM-6B architecture at a
small size (:func:`visualglm.demo.recipe.demo_config`). Stage 1 trains the vision tower alone to name each
image's colour and shape (a temporary linear head, not shipped), as VisualGLM-6B starts from a pretrained
EVA-CLIP. Stage 2 trains everything on the questions with AdamW, warmup and cosine decay: each step
encodes ``images_per_step`` randomly translated/flipped train images once and asks each of them
``questions_per_image`` of its own questions (English, Chinese or the description task), so the vision
tower's cost is shared by several answers. The loss is next-token cross entropy on the answer and the
``<eop>`` that ends it, exactly the tokens chat generation produces after ``<sop>``.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visualglm.checkpoint.load import build_model
from visualglm.checkpoint.save import save_checkpoint
from visualglm.checkpoint.staging import staged_directory
from visualglm.demo.data import PALETTE, Record, build_records
from visualglm.demo.recipe import IMAGE_SIZE, TrainRecipe, demo_config, train_tokenizer
from visualglm.finetune.plot import plot_losses
from visualglm.image import CLIP_MEAN, CLIP_STD
from visualglm.models.chatglm import chatglm_prompt_inputs
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.templates import visualglm_ids

COLOR_NAMES = sorted(PALETTE)
SHAPE_NAMES = ("circle", "rectangle", "triangle")


class Example:
    """One tokenized record: full ids (prompt + answer + <eop>), where the image slots and answer start."""

    __slots__ = ("ids", "image_start", "answer_start", "direct")

    def __init__(self, ids: list[int], image_start: int, answer_start: int, direct: bool) -> None:
        self.ids, self.image_start, self.answer_start = ids, image_start, answer_start
        self.direct = direct  # the answer names the colour or the shape (not yes/no)


def tokenize(records: list[Record], tokenizer: ChatGLMTokenizer, image_length: int,
             rng: random.Random) -> dict[int, list[Example]]:
    """``{image_id: [Example]}``: prompts exactly as chat builds them, answers encoded like generated text.

    easy-VQA's questions are all lower case; half of the English ones (a seeded coin) get a capital first
    letter, as people type them.
    """
    by_image: dict[int, list[Example]] = defaultdict(list)
    for record in records:
        question = record.question
        if record.lang == "en" and rng.random() < 0.5:
            question = question[:1].upper() + question[1:]
        prompt, start = visualglm_ids(tokenizer, question, image_length=image_length,
                                      english=record.lang == "en")
        answer = tokenizer.encode(record.answers[0], add_special_tokens=False)
        by_image[record.image_id].append(Example(prompt + answer + [tokenizer.eos_token_id], start, len(prompt),
                                                 record.qtype != "yes/no"))
    return by_image


def load_pixels(records: list[Record]) -> tuple[dict[int, int], torch.Tensor, torch.Tensor]:
    """All train images once: ``{image_id: row}``, uint8 ``[N, 3, 64, 64]`` and the foreground boxes
    ``[N, 4]`` (y0, y1, x0, x1; inclusive) that bound random translations."""
    from PIL import Image

    paths = {r.image_id: r.image for r in records}
    index = {image_id: row for row, image_id in enumerate(sorted(paths))}
    pixels = torch.empty(len(index), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    boxes = torch.empty(len(index), 4, dtype=torch.long)
    for image_id, row in index.items():
        with Image.open(paths[image_id]) as image:
            array = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
        pixels[row] = torch.from_numpy(array.copy()).permute(2, 0, 1)
        foreground = np.abs(array.astype(np.int32) - array[0, 0].astype(np.int32)).sum(-1) > 30
        ys, xs = np.nonzero(foreground) if foreground.any() else (np.array([0, IMAGE_SIZE - 1]),) * 2
        boxes[row] = torch.tensor([ys.min(), ys.max(), xs.min(), xs.max()])
    return index, pixels, boxes


def augment(pixels: torch.Tensor, boxes: torch.Tensor, rng: random.Random, max_shift: int) -> torch.Tensor:
    """Randomly translate (the background is flat, so rolling it is exact while the shape stays inside)
    and mirror each image; uint8 ``[B, 3, H, W]`` -> normalised float ``[B, 3, H, W]``."""
    out = pixels.clone()
    size = pixels.shape[-1]
    for i in range(out.shape[0]):
        y0, y1, x0, x1 = boxes[i].tolist()
        dy = rng.randint(-min(y0, max_shift), min(size - 1 - y1, max_shift))
        dx = rng.randint(-min(x0, max_shift), min(size - 1 - x1, max_shift))
        image = torch.roll(out[i], shifts=(dy, dx), dims=(1, 2))
        out[i] = image.flip(-1) if rng.random() < 0.5 else image
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (out.float() / 255 - mean) / std


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded init: matrices N(0, 1/fan_in) (so a 128-wide layer passes its input's variations on at full
    strength: with GPT-2's fixed 0.02 the Q-Former's cross-attention hands the language model image
    embeddings that differ by under 1% between a red and a blue shape, and nothing is learnt), embeddings
    N(0, 0.02), zero biases, unit LayerNorms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "ln_vision" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            elif "embeddings" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)


def lr_at(step: int, recipe: TrainRecipe) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_loss(model, examples: list[Example], image_embeds: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean cross entropy over the answer tokens (and ``<eop>``) of a left-padded batch.

    ``image_embeds`` ``[N, image_length, hidden]`` holds one row per example.
    """
    length = max(len(e.ids) for e in examples)
    pads = [length - len(e.ids) for e in examples]
    ids = torch.tensor([[pad_id] * p + e.ids for e, p in zip(examples, pads, strict=True)])
    positions, mask = chatglm_prompt_inputs(ids, model.config, pads)
    embeds = model.embed_with_images(ids, image_embeds, [e.image_start + p for e, p in zip(examples, pads,
                                                                                            strict=True)])
    hidden = model.hidden_states(ids, positions, mask, inputs_embeds=embeds)
    rows, cols, targets = [], [], []
    for row, (e, p) in enumerate(zip(examples, pads, strict=True)):
        for t in range(e.answer_start - 1, len(e.ids) - 1):  # position t predicts token t + 1
            rows.append(row)
            cols.append(p + t)
            targets.append(e.ids[t + 1])
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return F.cross_entropy(logits.float(), torch.tensor(targets))


def image_labels(records: list[Record]) -> dict[int, tuple[int, int]]:
    """``{image_id: (colour index, shape index)}`` from the description records (``A blue rectangle.``)."""
    labels = {}
    for record in records:
        if record.qtype == "describe" and record.lang == "en":
            color, shape = record.answers[0].removeprefix("A ").rstrip(".").split(" ")
            labels[record.image_id] = (COLOR_NAMES.index(color), SHAPE_NAMES.index(shape))
    return labels


def pretrain_vision(model, pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    recipe: TrainRecipe, rng: random.Random, bar=None, log=print) -> list[float]:
    """Stage 1: train ``model.image_encoder.vit`` to tell colours and shapes apart, through a temporary
    linear head over its mean-pooled output tokens (dropped afterwards). ``labels`` ``[N, 2]``."""
    vit = model.image_encoder.vit
    hidden = vit.config.hidden_size
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    head = torch.nn.Linear(hidden, len(COLOR_NAMES) + len(SHAPE_NAMES))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / hidden**0.5)
        head.bias.zero_()
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.vision_learning_rate, weight_decay=recipe.weight_decay)
    losses = []
    for step in range(recipe.vision_steps):
        rows = torch.tensor(rng.sample(range(len(labels)), min(recipe.images_per_step, len(labels))))
        images = augment(pixels[rows], boxes[rows], rng, recipe.max_shift)
        logits = head(vit(images).mean(dim=1))
        colors = len(COLOR_NAMES)
        loss = (F.cross_entropy(logits[:, :colors], labels[rows, 0])
                + F.cross_entropy(logits[:, colors:], labels[rows, 1]))
        for group in optimizer.param_groups:
            group["lr"] = recipe.vision_learning_rate * min(1.0, (step + 1) / recipe.warmup_steps)
        _step(optimizer, loss, params, recipe.grad_clip, losses)
        _report(bar, log, losses, step, recipe.vision_steps, "vision step")
    return losses


def train(out_dir: str | Path, recipe: TrainRecipe | None = None, *, progress: bool = True,
          log=print) -> Path:
    """Train the demo model and write it to ``out_dir`` (HF layout + tokenizer + ``training/`` with the
    recipe, the loss log and ``loss.png``). The directory appears complete or not at all."""
    recipe = recipe or TrainRecipe()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    started = time.perf_counter()
    records = build_records("train")
    log(f"data: {len(records):,} train records (English + Chinese + descriptions)")
    with tempfile.TemporaryDirectory(prefix="visualglm-demo-tok-") as tmp:
        vocab_file = train_tokenizer(tmp, records, recipe.vocab_size)
        vocab_bytes = vocab_file.read_bytes()
        tokenizer = ChatGLMTokenizer(vocab_file)
    config = demo_config(tokenizer)
    model = build_model(config, device="cpu")
    init_weights(model, recipe.seed)
    model.train()
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {tokenizer.vocab_size}")
    examples = tokenize(records, tokenizer, config.image_length, rng)
    index, pixels, boxes = load_pixels(records)
    image_ids = sorted(examples)
    bar = _progress(recipe.vision_steps + recipe.steps, progress)
    labels = image_labels(records)
    labelled = [i for i in image_ids if i in labels]
    rows = torch.tensor([index[i] for i in labelled])
    vision_losses = pretrain_vision(model, pixels[rows], boxes[rows], torch.tensor([labels[i] for i in labelled]),
                                    recipe, rng, bar, log) if recipe.vision_steps else []
    if recipe.freeze_vision:
        # As BLIP-2 and VisualGLM-6B keep their image encoder frozen. Left trainable, stage 2's early,
        # still meaningless gradients wash the shape features out of the tower (shape answers end at chance).
        model.image_encoder.vit.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.learning_rate,
                                  betas=(0.9, 0.98))
    order: list[int] = []
    cursor = {image_id: 0 for image_id in image_ids}
    for image_id in image_ids:
        rng.shuffle(examples[image_id])
    direct = {image_id: [e for e in examples[image_id] if e.direct] for image_id in image_ids}
    losses: list[float] = []
    for step in range(recipe.steps):
        if len(order) < recipe.images_per_step:
            fresh = image_ids[:]
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:recipe.images_per_step], order[recipe.images_per_step:]
        batch: list[Example] = []
        for image_id in chosen:  # each image cycles through its own shuffled questions
            items = direct[image_id] if step < recipe.focus_steps else examples[image_id]
            for _ in range(recipe.questions_per_image):
                batch.append(items[cursor[image_id] % len(items)])
                cursor[image_id] += 1
        rows = torch.tensor([index[i] for i in chosen])
        images = augment(pixels[rows], boxes[rows], rng, recipe.max_shift)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        image_embeds = model.image_encoder(images).repeat_interleave(recipe.questions_per_image, dim=0)
        loss = batch_loss(model, batch, image_embeds, config.pad_token_id)
        _step(optimizer, loss, [p for _, p in trainable], recipe.grad_clip, losses)
        _report(bar, log, losses, step, recipe.steps, "step")
    if bar is not None:
        bar.close()
    minutes = (time.perf_counter() - started) / 60
    log(f"trained {recipe.steps} steps in {minutes:.1f} min; final loss (mean of last 100) "
        f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    model.eval()
    model.requires_grad_(True)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="visualglm-demo-ckpt-") as tmp:
        checkpoint = save_checkpoint(model, Path(tmp) / "model")
        with staged_directory(out_dir) as staging:
            for item in checkpoint.iterdir():
                item.rename(staging / item.name)
            (staging / "ice_text.model").write_bytes(vocab_bytes)
            (staging / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "ChatGLMTokenizer", "vocab_file": "ice_text.model", "num_image_tokens": 0,
                 "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]",
                 "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>", "do_lower_case": False,
                 "remove_space": False}, indent=2) + "\n")
            training = staging / "training"
            training.mkdir()
            (training / "recipe.json").write_text(json.dumps(
                {**asdict(recipe), "minutes": round(minutes, 2), "records": len(records)}, indent=2) + "\n")
            (training / "loss.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": round(v, 5)}) + "\n"
                                                         for i, v in enumerate(losses)))
            _plot(losses, training / "loss.png", "visualglm-demo training loss (stage 2: answers)")
            if vision_losses:
                (training / "vision_loss.jsonl").write_text("".join(
                    json.dumps({"step": i + 1, "loss": round(v, 5)}) + "\n" for i, v in enumerate(vision_losses)))
                _plot(vision_losses, training / "vision_loss.png",
                      "visualglm-demo stage 1: vision tower, colour + shape")
    log(f"wrote {out_dir}")
    return out_dir


def _step(optimizer, loss: torch.Tensor, params: list, grad_clip: float, losses: list[float]) -> None:
    """One clipped optimizer step on ``loss``; its value is appended to ``losses``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    losses.append(loss.item())


def _report(bar, log, losses: list[float], step: int, total: int, label: str) -> None:
    """Advance the progress bar (mean loss of the last 50 steps), or log every 100 steps without one."""
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", stage=label.split()[0])
    elif step % 100 == 0 or step == total - 1:
        log(f"{label} {step + 1}/{total} loss {losses[-1]:.4f}")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="demo train", unit="step", dynamic_ncols=True)


def _plot(losses: list[float], path: Path, title: str) -> None:
    """The loss per step on a log axis, raw and smoothed over ~2% of the run."""
    plot_losses(list(enumerate(losses, 1)), [], path, title, log_scale=True,
                smooth_window=max(1, len(losses) // 50))
