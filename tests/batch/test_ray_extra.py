"""Without ray installed, --ray is one clear line naming the extra (the local path needs nothing more)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from visualglm.batch import run_batch_on_ray

from .conftest import write_rows


def test_missing_ray_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    source = write_rows(tmp_path / "rows.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(RuntimeError, match=r"ray is not installed: install the extra with pip install "
                       r"'visualglm\[ray\]'"):
        run_batch_on_ray(source, tmp_path / "out")
