"""Data sets for the batch tests: rows about the demo model's example images (easy-VQA style)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from visualglm.demo import EXAMPLES_DIR

QUESTIONS = ("What shape is in the image?", "What color is the shape?", "Is there a circle in the image?",
             "Is the shape red?", "Does the image contain a triangle?")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def vqa_rows(count: int, seed: int = 0) -> list[dict]:
    """``count`` rows: image questions (some sampled hot, so answers vary with the seed) and text prompts."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        if i % 9 == 4:
            rows.append({"id": i, "prompt": "Tell me about shapes and colors.", "temperature": 1.6, "top_p": 1.0})
            continue
        row = {"id": f"row-{i}", "image": f"example-{rng.randint(1, 3)}.png", "prompt": rng.choice(QUESTIONS)}
        if i % 3 == 0:
            row.update(temperature=1.6, top_p=1.0, top_k=0)
        rows.append(row)
    return rows


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A folder with the demo's example images (rows name them relative to the JSONL file)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for image in sorted(EXAMPLES_DIR.glob("*.png")):
        shutil.copy(image, folder / image.name)
    return folder
