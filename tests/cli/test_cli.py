"""The ``visualglm`` command, run as a user would (subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visualglm", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_version_and_help() -> None:
    assert _run("--version").stdout.startswith("visualglm ")
    result = _run()
    assert result.returncode == 2 and "demo" in result.stderr and "info" in result.stderr


def test_info_describes_a_checkpoint(tiny_checkpoint: Path) -> None:
    result = _run("info", str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr
    assert "family:     ChatGLM-6B" in result.stdout
    assert "layers:     2, hidden 64, heads 4, vocab 1024" in result.stdout


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    result = _run("info", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"visualglm info: error: checkpoint directory '{tmp_path / 'missing'}' does not exist"]


def test_bad_flag_is_rejected() -> None:
    result = _run("demo", "--max-new-tokens", "many")
    assert result.returncode == 2 and "invalid int value" in result.stderr


def test_demo_runs_offline_and_says_it_is_random() -> None:
    result = _run("demo", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "RANDOM" in result.stdout
    assert "greedy decoding with the KV cache" in result.stdout
