"""``visualglm demo train``: train the shipped demo model from scratch on easy-VQA's train split.

Recipe (all seeded): a SentencePiece vocabulary on the training text; the VisualGLM-6B architecture at a
small size (:func:`visualglm.demo.recipe.demo_config`). Stage 1 trains the vision tower alone to name each
image's colour and shape (a temporary linear head, not shipped), as VisualGLM-6B starts from a pretrained
EVA-CLIP. Stage 2 trains the Q-Former, projection and language model (tower frozen) with AdamW, warmup and
cosine decay: each step encodes ``images_per_step`` randomly translated/flipped train images once and asks
each of them ``questions_per_image`` questions, each the last turn of a fresh conversation of 1-5 turns
about that image (:mod:`visualglm.demo.dialogue`: easy-VQA questions, grammar phrasings and out-of-scope
inputs, English, Chinese or mixed). The prompt is ``build_prompt_ids``'s, the one ``ChatSession`` sends,
with the earlier turns as history; the loss is next-token cross entropy on the last answer and the
``<eop>`` that ends it, exactly the tokens chat generation produces after ``<sop>``.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visualglm.checkpoint.load import build_model
from visualglm.checkpoint.save import save_checkpoint
from visualglm.checkpoint.staging import staged_directory
from visualglm.demo.data import PALETTE
from visualglm.demo.dialogue import (
    LANG_MODES,
    Conversation,
    ImageFacts,
    history_of,
    image_facts,
    sample_conversation,
)
from visualglm.demo.recipe import IMAGE_SIZE, TrainRecipe, demo_config, train_tokenizer
from visualglm.demo.translate import COLORS, SHAPES
from visualglm.finetune.plot import plot_losses
from visualglm.generation.chat import build_prompt_ids
from visualglm.image import CLIP_MEAN, CLIP_STD
from visualglm.models.chatglm import chatglm_prompt_inputs
from visualglm.tokenizers.chatglm import ChatGLMTokenizer

COLOR_NAMES = sorted(PALETTE)
SHAPE_NAMES = ("circle", "rectangle", "triangle")


class Example:
    """One tokenized question: full ids (prompt + answer + <eop>), where the image slots and the answer
    start, and which row of the step's images it asks about."""

    __slots__ = ("ids", "image_start", "answer_start", "row")

    def __init__(self, ids: list[int], image_start: int, answer_start: int, row: int = 0) -> None:
        self.ids, self.image_start, self.answer_start, self.row = ids, image_start, answer_start, row


def make_example(model, tokenizer: ChatGLMTokenizer, conversation: Conversation, row: int = 0) -> Example:
    """The conversation's last turn as a training example: the prompt ``ChatSession`` would send after the
    earlier turns (their reference answers as history), then the answer encoded like generated text."""
    last = conversation.turns[-1]
    history = history_of(conversation, len(conversation.turns) - 1)
    prompt, start = build_prompt_ids(model, tokenizer, last.question, history, image=True)
    answer = tokenizer.encode(last.answers[0], add_special_tokens=False)
    return Example(prompt + answer + [tokenizer.eos_token_id], start, len(prompt), row)


def load_pixels(facts: list[ImageFacts]) -> tuple[torch.Tensor, torch.Tensor]:
    """All train images once, in ``facts`` order: uint8 ``[N, 3, 64, 64]`` and the foreground boxes
    ``[N, 4]`` (y0, y1, x0, x1; inclusive) that bound random translations."""
    from PIL import Image

    pixels = torch.empty(len(facts), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    boxes = torch.empty(len(facts), 4, dtype=torch.long)
    for row, f in enumerate(facts):
        with Image.open(f.path) as image:
            array = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
        pixels[row] = torch.from_numpy(array.copy()).permute(2, 0, 1)
        foreground = np.abs(array.astype(np.int32) - array[0, 0].astype(np.int32)).sum(-1) > 30
        ys, xs = np.nonzero(foreground) if foreground.any() else (np.array([0, IMAGE_SIZE - 1]),) * 2
        boxes[row] = torch.tensor([ys.min(), ys.max(), xs.min(), xs.max()])
    return pixels, boxes


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


def batch_loss(model, examples: list[Example], image_embeds: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed cross entropy over the answer tokens (and ``<eop>``) of a left-padded batch, and how many
    tokens it sums. ``image_embeds`` ``[N, image_length, hidden]``: example e's image is row ``e.row``."""
    length = max(len(e.ids) for e in examples)
    pads = [length - len(e.ids) for e in examples]
    ids = torch.tensor([[pad_id] * p + e.ids for e, p in zip(examples, pads, strict=True)])
    positions, mask = chatglm_prompt_inputs(ids, model.config, pads)
    embeds = model.embed_with_images(ids, image_embeds[torch.tensor([e.row for e in examples])],
                                     [e.image_start + p for e, p in zip(examples, pads, strict=True)])
    hidden = model.hidden_states(ids, positions, mask, inputs_embeds=embeds)
    rows, cols, targets = [], [], []
    for row, (e, p) in enumerate(zip(examples, pads, strict=True)):
        for t in range(e.answer_start - 1, len(e.ids) - 1):  # position t predicts token t + 1
            rows.append(row)
            cols.append(p + t)
            targets.append(e.ids[t + 1])
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return F.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum"), len(targets)


def length_chunks(lengths: Sequence[int], overhead_tokens: int) -> list[tuple[int, int]]:
    """Split ascending ``lengths`` into contiguous chunks ``[begin, end)`` that minimise the tokens the chunks
    compute, padding included (each chunk pads to its longest), plus ``overhead_tokens`` per chunk (the fixed
    cost of one more, smaller batch of matrix products). Exact, by dynamic programming over the split points.
    """
    best = [0.0] + [math.inf] * len(lengths)  # best[j]: cheapest cost of the first j sequences
    split = [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for begin in range(end):
            cost = best[begin] + lengths[end - 1] * (end - begin) + overhead_tokens
            if cost < best[end]:
                best[end], split[end] = cost, begin
    chunks, end = [], len(lengths)
    while end:
        chunks.append((split[end], end))
        end = split[end]
    return chunks[::-1]


def step_loss(model, examples: list[Example], image_embeds: torch.Tensor, pad_id: int, buckets: int,
              overhead_tokens: int = 0) -> torch.Tensor:
    """Mean answer-token cross entropy of ``examples``, run in chunks of similar length (sorted by length, so
    little of each chunk is padding): ``buckets`` chunks of equal count, or with ``buckets=0`` the chunks
    :func:`length_chunks` finds (on the demo's mix 1.15x the real tokens
    against 1.32x with four equal chunks)."""
    ordered = sorted(examples, key=lambda e: len(e.ids))
    if buckets:
        size = math.ceil(len(ordered) / buckets)
        bounds = [(begin, begin + size) for begin in range(0, len(ordered), size)]
    else:
        bounds = length_chunks([len(e.ids) for e in ordered], overhead_tokens)
    total, count = None, 0
    for begin, end in bounds:
        loss, n = batch_loss(model, ordered[begin:end], image_embeds, pad_id)
        total = loss if total is None else total + loss
        count += n
    return total / count


def branch_dropout(model, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout with rate ``p`` on what each language-model layer adds to its residual stream (the attention's
    output projection and the MLP), while the model is in training mode: forward hooks on the built model,
    which leave its weights and its inference untouched. Remove the returned handles to end it."""

    def drop(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p, module.training)

    return [module.register_forward_hook(drop) for block in model.transformer.layers
            for module in (block.attention.dense, block.mlp)]


def image_labels(facts: list[ImageFacts]) -> torch.Tensor:
    """``[N, 2]`` (colour index, shape index) of each image, in ``facts`` order."""
    return torch.tensor([[COLOR_NAMES.index(f.color), SHAPE_NAMES.index(f.shape)] for f in facts])


def name_piece_ids(tokenizer: ChatGLMTokenizer) -> list[list[torch.Tensor]]:
    """The piece that names each colour and each shape inside a sentence, per language:
    ``[[colour ids EN [8], colour ids ZH [8]], [shape ids EN [3], shape ids ZH [3]]]`` in
    ``COLOR_NAMES`` / ``SHAPE_NAMES`` order ("▁red", "红" of "红色": a name's first piece that no other name of
    its kind has, so the shared "色" / "形" is never chosen)."""
    return [[_own_pieces(tokenizer, "a ", list(names)), _own_pieces(tokenizer, "有", [chinese[n] for n in names])]
            for names, chinese in ((COLOR_NAMES, COLORS), (SHAPE_NAMES, SHAPES))]


def _own_pieces(tokenizer: ChatGLMTokenizer, prefix: str, words: list[str]) -> torch.Tensor:
    """``[len(words)]``: each word's first piece, as spelt after ``prefix``, that none of the other words has."""
    pieces = [tokenizer.encode(prefix + word, add_special_tokens=False)[1:] for word in words]
    chosen = []
    for i, own in enumerate(pieces):
        others = {p for j, other in enumerate(pieces) if j != i for p in other}
        unique = [p for p in own if p not in others]
        if not unique:
            raise ValueError(f"the vocabulary has no piece of its own for {words[i]!r}")
        chosen.append(unique[0])
    return torch.tensor(chosen)


def name_alignment_loss(image_embeds: torch.Tensor, word_embeddings: torch.Tensor,
                        names: list[list[torch.Tensor]], labels: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """Cross entropy of naming each image's colour and shape by the cosine of its mean image embedding with
    the names' word embeddings, summed over the two kinds and the two languages. ``image_embeds``
    ``[B, image_length, hidden]``, ``word_embeddings`` ``[vocab, hidden]``, ``names`` from
    :func:`name_piece_ids`, ``labels`` ``[B, 2]``. Cosines (times ``scale``), so the names' embeddings keep
    the scale of the other words' while they turn towards the images they name."""
    features = F.normalize(image_embeds.mean(dim=1), dim=-1)
    loss = torch.zeros(())
    for kind, per_language in enumerate(names):
        for ids in per_language:
            logits = scale * features @ F.normalize(word_embeddings[ids], dim=-1).T
            loss = loss + F.cross_entropy(logits, labels[:, kind])
    return loss


def pretrain_vision(model, pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    recipe: TrainRecipe, rng: random.Random, bar=None, log=print,
                    names: list[list[torch.Tensor]] | None = None) -> list[float]:
    """Stage 1: train the image encoder (``model.image_encoder``: vision tower, Q-Former, projection) to tell
    colours and shapes apart, through temporary linear heads (dropped afterwards) over the mean-pooled
    tower tokens and over the mean of the image embeddings the language model will read. ``labels`` ``[N, 2]``.

    The tower's head is v1's stage 1 (the role of a pretrained EVA-CLIP). The head on the Q-Former's output
    is BLIP-2's first stage in miniature: without it the image embeddings carried shape but not colour to the
    language model after 800 stage-2 steps (colour answers at chance), with it both from the start.
    Given ``names`` (:func:`name_piece_ids`, when ``recipe.name_alignment`` is on) the names' word embeddings
    learn too, through :func:`name_alignment_loss`.
    """
    encoder = model.image_encoder
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    classes = len(COLOR_NAMES) + len(SHAPE_NAMES)
    heads = torch.nn.ModuleList([torch.nn.Linear(encoder.vit.config.hidden_size, classes),
                                 torch.nn.Linear(model.config.hidden_size, classes)])
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / head.in_features**0.5)
            head.bias.zero_()
    params = list(encoder.parameters()) + list(heads.parameters())
    groups = [{"params": params, "weight_decay": recipe.weight_decay}]
    word_embeddings = model.transformer.word_embeddings.weight
    if names is not None:  # only the names' rows get a gradient; no decay, so the other rows stay as initialised
        groups.append({"params": [word_embeddings], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=recipe.vision_learning_rate)
    clipped = [p for group in groups for p in group["params"]]
    colors = len(COLOR_NAMES)
    losses = []
    for step in range(recipe.vision_steps):
        rows = torch.tensor(rng.sample(range(len(labels)), min(recipe.images_per_step, len(labels))))
        images = augment(pixels[rows], boxes[rows], rng, recipe.max_shift)
        tokens = encoder.vit(images)
        embeds = encoder.glm_proj(encoder.qformer(tokens))
        loss = torch.zeros(())
        for head, features in zip(heads, (tokens, embeds), strict=True):
            logits = head(features.mean(dim=1))
            loss = loss + (F.cross_entropy(logits[:, :colors], labels[rows, 0])
                           + F.cross_entropy(logits[:, colors:], labels[rows, 1]))
        if names is not None:
            loss = loss + recipe.name_alignment * name_alignment_loss(embeds, word_embeddings, names, labels[rows])
        for group in optimizer.param_groups:
            group["lr"] = recipe.vision_learning_rate * min(1.0, (step + 1) / recipe.warmup_steps)
        _step(optimizer, loss, clipped, recipe.grad_clip, losses)
        _report(bar, log, losses, step, recipe.vision_steps, "vision step")
    return losses


def train(out_dir: str | Path, recipe: TrainRecipe | None = None, *, progress: bool = True,
          log=print) -> Path:
    """Train the demo model and write it to ``out_dir`` (HF layout + tokenizer + ``training/`` with the
    recipe, the timings, the loss logs and their curves). The directory appears complete or not at all."""
    recipe = recipe or TrainRecipe()
    recipe.validate()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    facts = image_facts("train")
    log(f"data: {len(facts):,} train images, {sum(len(f.questions) for f in facts):,} easy-VQA questions "
        "(+ Chinese, grammar phrasings, out-of-scope inputs, conversations)")
    with tempfile.TemporaryDirectory(prefix="visualglm-demo-tok-") as tmp:
        vocab_file = train_tokenizer(tmp, recipe.vocab_size, recipe.answer_pieces)
        vocab_bytes = vocab_file.read_bytes()
        tokenizer = ChatGLMTokenizer(vocab_file)
    config = demo_config(tokenizer)
    model = build_model(config, device="cpu")
    init_weights(model, recipe.seed)
    model.train()
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {tokenizer.vocab_size}")
    pixels, boxes = load_pixels(facts)
    timings["data_and_vocabulary"] = time.perf_counter() - started
    bar = _progress(recipe.vision_steps + recipe.steps, progress)
    labels = image_labels(facts)
    names = name_piece_ids(tokenizer) if recipe.name_alignment else None
    vision_losses = pretrain_vision(model, pixels, boxes, labels, recipe, rng, bar, log,
                                    names) if recipe.vision_steps else []
    timings["stage_1_vision"] = time.perf_counter() - started - sum(timings.values())
    if recipe.freeze_vision:
        # As BLIP-2 and VisualGLM-6B keep their image encoder frozen. Left trainable, stage 2's early,
        # still meaningless gradients wash the shape features out of the tower (shape answers end at chance).
        model.image_encoder.vit.requires_grad_(False)
    if recipe.freeze_encoder:
        model.image_encoder.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The Q-Former is held (learning rate 0) for the first qformer_hold_steps: stage 1 taught it colour and
    # shape, and the language model's first, still meaningless gradients would otherwise wash that out
    # before the language model learns to read it (runs without the hold sometimes never learnt colours).
    groups = []
    for held in (False, True):
        members = [(n, p) for n, p in trainable if n.startswith("image_encoder.qformer.") == held]
        groups += [{"params": [p for _, p in members if p.dim() >= 2], "weight_decay": recipe.weight_decay,
                    "held": held},
                   {"params": [p for _, p in members if p.dim() < 2], "weight_decay": 0.0, "held": held}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.learning_rate, betas=(0.9, 0.98))
    mix = recipe.turn_mix()
    lengths = range(1, len(recipe.turn_weights) + 1)
    order: list[int] = []
    losses: list[float] = []
    dropout_hooks = branch_dropout(model, recipe.dropout) if recipe.dropout else []
    for step in range(recipe.steps):
        if len(order) < recipe.images_per_step:
            fresh = list(range(len(facts)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:recipe.images_per_step], order[recipe.images_per_step:]
        batch: list[Example] = []
        for row, index in enumerate(chosen):
            for _ in range(recipe.questions_per_image):
                turns = rng.choices(lengths, recipe.turn_weights)[0]
                mode = rng.choices(LANG_MODES, recipe.lang_mode_weights)[0]
                conversation = sample_conversation(facts[index], turns, mode, rng, mix)
                batch.append(make_example(model, tokenizer, conversation, row))
        rows = torch.tensor(chosen)
        images = augment(pixels[rows], boxes[rows], rng, recipe.max_shift)
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if group["held"] and step < recipe.qformer_hold_steps else lr_at(step, recipe)
        image_embeds = model.image_encoder(images)
        loss = step_loss(model, batch, image_embeds, config.pad_token_id, recipe.length_buckets,
                         recipe.chunk_overhead_tokens)
        if names is not None:
            loss = loss + recipe.name_alignment * name_alignment_loss(
                image_embeds, model.transformer.word_embeddings.weight, names, labels[rows])
        _step(optimizer, loss, [p for _, p in trainable], recipe.grad_clip, losses)
        _report(bar, log, losses, step, recipe.steps, "step")
    for hook in dropout_hooks:
        hook.remove()
    if bar is not None:
        bar.close()
    timings["stage_2_answers"] = time.perf_counter() - started - sum(timings.values())
    minutes = (time.perf_counter() - started) / 60
    log(f"trained {recipe.vision_steps} + {recipe.steps} steps in {minutes:.1f} min; final loss (mean of last "
        f"100) {sum(losses[-100:]) / len(losses[-100:]):.4f}")
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
                {**asdict(recipe), "minutes": round(minutes, 2), "images": len(facts),
                 "timings_minutes": {k: round(v / 60, 2) for k, v in timings.items()},
                 "machine": machine_info()}, indent=2) + "\n")
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


def machine_info() -> dict:
    """Where the training ran (so its time can be compared): CPUs, torch threads, torch version."""
    import os
    import platform

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine()}


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
