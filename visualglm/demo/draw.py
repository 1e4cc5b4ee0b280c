"""Draw new images in easy-VQA's style: one flat-coloured circle, rectangle or triangle on a light
background. Used for the shipped example images and to check that the demo model generalises beyond the
data set's own pictures (other sizes, positions and canvas sizes)."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from visualglm.demo.data import PALETTE
from visualglm.demo.translate import SHAPES


def draw_shape(color: str, shape: str, *, canvas: int = 64, size: float = 0.4, center: tuple[float, float] = (0.5, 0.5),
               aspect: float = 1.0, background: tuple[int, int, int] = (245, 240, 235)) -> Image.Image:
    """An RGB image ``canvas`` px square. ``size`` is the shape's height as a fraction of the canvas,
    ``center`` its centre in fractions, ``aspect`` a rectangle's width/height."""
    if color not in PALETTE:
        raise ValueError(f"unknown colour {color!r}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    cx, cy = center[0] * canvas, center[1] * canvas
    half = size * canvas / 2
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "rectangle":
        draw.rectangle((cx - half * aspect, cy - half, cx + half * aspect, cy + half), fill=fill)
    else:  # upright, roughly equilateral
        width = half * 1.15
        draw.polygon([(cx, cy - half), (cx - width, cy + half), (cx + width, cy + half)], fill=fill)
    return image


def random_drawing(rng: random.Random, canvas: int = 64) -> tuple[Image.Image, str, str]:
    """A random image in the data set's style, with its colour and shape."""
    color = rng.choice(sorted(PALETTE))
    shape = rng.choice(sorted(SHAPES))
    size = rng.uniform(0.15, 0.6)
    margin = size / 2 * (1.2 if shape != "rectangle" else 1.6) + 0.02
    center = (rng.uniform(margin, 1 - margin), rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02))
    aspect = rng.uniform(0.5, 1.6) if shape == "rectangle" else 1.0
    background = tuple(rng.randint(225, 252) for _ in range(3))
    image = draw_shape(color, shape, canvas=canvas, size=size, center=center, aspect=aspect, background=background)
    return image, color, shape


# The shipped example images (visualglm/demo/examples/): (file, colour, shape, canvas, size, centre, aspect).
EXAMPLES = (
    ("example-1.png", "green", "circle", 64, 0.35, (0.3, 0.6), 1.0),
    ("example-2.png", "red", "triangle", 128, 0.3, (0.65, 0.35), 1.0),
    ("example-3.png", "teal", "rectangle", 96, 0.3, (0.5, 0.7), 1.6),
)


def write_examples(directory) -> list[str]:
    """(Re)draw the shipped example images into ``directory``; returns the file names."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, color, shape, canvas, size, center, aspect in EXAMPLES:
        draw_shape(color, shape, canvas=canvas, size=size, center=center, aspect=aspect).save(directory / name)
    return [e[0] for e in EXAMPLES]
