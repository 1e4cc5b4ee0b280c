"""Loss-curve PNGs (fine-tuning runs and the demo model's training)."""

from __future__ import annotations

import math

from PIL import Image

from visualglm.finetune.plot import EVAL_COLOR, RAW_COLOR, TRAIN_COLOR, plot_losses, smooth


def _colours(path) -> dict[tuple[int, int, int], int]:
    """Pixel count per colour (anti-aliased text adds a few pixels of many shades: compare counts)."""
    return {rgb: n for n, rgb in Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20)}


def test_smooth_is_a_trailing_mean() -> None:
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_train_and_eval_curves(tmp_path) -> None:
    path = plot_losses([(s, 2.0 - s / 100) for s in range(1, 100)], [(10, 1.9), (90, 1.2)], tmp_path / "a.png")
    colours = _colours(path)
    assert colours[TRAIN_COLOR] > 500 and colours[EVAL_COLOR] > 50 and colours.get(RAW_COLOR, 0) < 20


def test_log_scale_with_smoothing_draws_raw_and_average(tmp_path) -> None:
    losses = [(s, 5 * math.exp(-s / 50) + 0.01 * (s % 5)) for s in range(1, 400)]
    path = plot_losses(losses, [], tmp_path / "b.png", log_scale=True, smooth_window=10)
    colours = _colours(path)
    assert colours[TRAIN_COLOR] > 500 and colours[RAW_COLOR] > 300 and colours.get(EVAL_COLOR, 0) < 20
    assert Image.open(path).size == (800, 480)
