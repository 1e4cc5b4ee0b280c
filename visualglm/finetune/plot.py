"""Loss curves as PNG with Pillow alone (no plotting library needed)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 800, 480, 60
TRAIN_COLOR, EVAL_COLOR, AXIS_COLOR, RAW_COLOR = (31, 119, 180), (214, 39, 40), (80, 80, 80), (200, 200, 200)
LOG_FLOOR = 1e-4


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(train: Sequence[tuple[int, float]], evals: Sequence[tuple[int, float]], path: str | Path,
                title: str = "loss", *, log_scale: bool = False, smooth_window: int = 1) -> Path:
    """Draw train (line) and eval (dots) loss against the step into a PNG at ``path``.

    ``log_scale`` puts the losses on a log10 axis (floored at 1e-4); with ``smooth_window`` > 1 the raw
    train curve is drawn in light grey under its trailing moving average.
    """
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    if log_scale:
        train = [(s, math.log10(max(v, LOG_FLOOR))) for s, v in train]
        evals = [(s, math.log10(max(v, LOG_FLOOR))) for s, v in evals]
    points = [p for p in list(train) + list(evals) if math.isfinite(p[1])]
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline=AXIS_COLOR)
    draw.text((left, 6), title, fill=AXIS_COLOR)
    if points:
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
        if x_hi == x_lo:
            x_hi = x_lo + 1
        if y_hi == y_lo:
            y_hi = y_lo + 1e-3

        def xy(step: float, value: float) -> tuple[float, float]:
            return (left + (step - x_lo) / (x_hi - x_lo) * (right - left),
                    bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - top))

        for value in _ticks(y_lo, y_hi):
            _, y = xy(x_lo, value)
            draw.line((left - 4, y, left, y), fill=AXIS_COLOR)
            draw.text((4, y - 6), f"{10**value if log_scale else value:.3g}", fill=AXIS_COLOR)
        for step in _ticks(x_lo, x_hi):
            x, _ = xy(step, y_lo)
            draw.line((x, bottom, x, bottom + 4), fill=AXIS_COLOR)
            draw.text((x - 10, bottom + 8), f"{step:.0f}", fill=AXIS_COLOR)
        finite = [(s, v) for s, v in train if math.isfinite(v)]
        line = [xy(s, v) for s, v in finite]
        if len(line) > 1 and smooth_window > 1:
            draw.line(line, fill=RAW_COLOR)
            averaged = smooth([v for _, v in finite], smooth_window)
            line = [xy(s, v) for (s, _), v in zip(finite, averaged, strict=True)]
        if len(line) > 1:
            draw.line(line, fill=TRAIN_COLOR, width=2)
        elif line:
            x, y = line[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=TRAIN_COLOR)
        for s, v in evals:
            if math.isfinite(v):
                x, y = xy(s, v)
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=EVAL_COLOR)
    draw.text((right - 150, top + 6), "train", fill=TRAIN_COLOR)
    if evals:
        draw.text((right - 100, top + 6), "eval", fill=EVAL_COLOR)
    draw.text(((left + right) // 2 - 12, HEIGHT - 20), "step", fill=AXIS_COLOR)
    path = Path(path)
    image.save(path)
    return path


def plot_metrics_file(metrics: str | Path, png: str | Path) -> Path:
    """Plot a trainer's ``metrics.jsonl`` (rows with ``loss`` and/or ``eval_loss``)."""
    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    return plot_losses(train, evals, png)
