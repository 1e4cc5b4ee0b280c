"""Shared fixtures: where the golden vectors are, and tiny checkpoints written by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests compare numbers at 1e-4; keep torch's default intra-op threads but a fixed seed."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """No test may reach the network: the hub client is told it is offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def random_chatglm(config_name: str = "chatglm-tiny", seed: int = 0, **overrides) -> torch.nn.Module:
    """A ChatGLM model with random weights large enough to make every part of the network matter."""
    import dataclasses

    from visualglm.checkpoint.load import build_model
    from visualglm.checkpoint.tiny import init_random_weights
    from visualglm.config import get_config

    config = dataclasses.replace(get_config(config_name), **overrides)
    model = init_random_weights(build_model(config, device="cpu"), weight_scale=2.0, seed=seed)
    config.extra = {}
    model.config = config
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random ChatGLM-6B-layout checkpoint (config.json + model.safetensors), written once."""
    from visualglm.checkpoint.save import save_checkpoint

    directory = tmp_path_factory.mktemp("ckpt") / "tiny-chatglm"
    save_checkpoint(random_chatglm(), directory)
    return directory


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint with its own ChatGLM-style tokenizer (ice_text.model)."""
    from visualglm.checkpoint.tiny import write_tiny_random_checkpoint

    return write_tiny_random_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="session")
def tiny_visual_checkpoint(tmp_path_factory) -> Path:
    """A tiny random VisualGLM-6B-layout checkpoint with its own tokenizer."""
    from visualglm.checkpoint.tiny import write_tiny_random_checkpoint

    return write_tiny_random_checkpoint(tmp_path_factory.mktemp("visual") / "tiny-visual", family="visualglm")


def make_png(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture(scope="session")
def glm4v_checkpoint(tmp_path_factory) -> Path:
    """The golden tiny GLM-4V checkpoint with its tokenizer files under the standard names."""
    import shutil

    source = GOLDEN_DIR / "glm-4v-9b"
    if not (source / "tiny_tokenizer.model").is_file():
        pytest.skip(f"no golden glm-4v-9b folder under {GOLDEN_DIR}")
    target = tmp_path_factory.mktemp("glm4v") / "tiny-glm4v"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, target / name)
    shutil.copy(source / "tiny_tokenizer.model", target / "tokenizer.model")
    shutil.copy(source / "tiny_tokenizer_config.json", target / "tokenizer_config.json")
    return target
