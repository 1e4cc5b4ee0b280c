"""A loss curve as a PNG with Pillow only (no plotting library needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curve(values: Sequence[float], path: str | Path, *, title: str = "loss", width: int = 640,
               height: int = 400) -> Path:
    """Draw ``values`` (raw in light grey, smoothed in blue) on a log-scaled y axis; write ``path``."""
    from PIL import Image, ImageDraw

    if not values:
        raise ValueError("nothing to plot")
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    floor = 1e-4
    logs = [math.log10(max(v, floor)) for v in values]
    low, high = min(logs), max(logs)
    if high - low < 1e-6:
        high = low + 1

    def xy(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, len(values) - 1))
        y = bottom - (bottom - top) * ((math.log10(max(value, floor)) - low) / (high - low))
        return x, y

    draw.rectangle((left, top, right, bottom), outline="black")
    for exponent in range(math.floor(low), math.ceil(high) + 1):
        if low <= exponent <= high:
            _, y = xy(0, 10.0**exponent)
            draw.line((left, y, right, y), fill=(220, 220, 220))
            draw.text((5, y - 6), f"1e{exponent}", fill="black")
    draw.line([xy(i, v) for i, v in enumerate(values)], fill=(200, 200, 200))
    draw.line([xy(i, v) for i, v in enumerate(smooth(values, max(1, len(values) // 50)))], fill=(30, 60, 200),
              width=2)
    draw.text((left, 8), title, fill="black")
    draw.text((left, bottom + 10), f"step 1 .. {len(values)}", fill="black")
    draw.text((right - 150, bottom + 10), f"last {values[-1]:.4f}", fill="black")
    path = Path(path)
    image.save(path)
    return path
