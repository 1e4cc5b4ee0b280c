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
