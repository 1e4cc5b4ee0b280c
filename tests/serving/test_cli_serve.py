"""``visualglm serve`` / ``visualglm web`` as a user runs them, and the message when an extra is missing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from visualglm.serving import require_extra


def test_missing_extra_names_it(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install 'visualglm\[web\]'"):
        require_extra("web")
    require_extra("serve")


def test_help_lists_the_flags() -> None:
    serve_flags = ("--api-key", "--allow-remote-images", "--quant", "--host", "--port", "--max-batch")
    for command, flags in (("serve", serve_flags),
                           ("web", ("--share", "--quant", "--port"))):
        result = subprocess.run([sys.executable, "-m", "visualglm", command, "--help"], capture_output=True,
                                text=True, timeout=60, check=True)
        assert all(flag in result.stdout for flag in flags), result.stdout


def test_serve_command_binds_loopback_and_checks_the_key(tiny_visual_checkpoint) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "visualglm", "serve", "--model", str(tiny_visual_checkpoint), "--port", str(port),
         "--api-key", "t0ken", "--max-new-tokens", "8", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                health = httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert health.json()["model"] == tiny_visual_checkpoint.name
        assert httpx.get(f"{url}/v1/models").status_code == 401
        answer = httpx.post(url, json={"text": "hi", "max_length": 40}, headers={"Authorization": "Bearer t0ken"},
                            timeout=60)
        assert answer.status_code == 200 and answer.json()["status"] == 200
        listeners = [c for c in psutil.Process(server.pid).net_connections("tcp") if c.status == "LISTEN"]
        assert [c.laddr.ip for c in listeners] == ["127.0.0.1"]
        chunk = httpx.get(f"{url}/health", timeout=5).json()["prefill_chunk"]  # measured before the answer
    finally:
        server.terminate()
        _, log = server.communicate(timeout=30)
    # At info level the package's own lines show: the load, the start-up objects frozen and the chunk measured.
    assert f"loaded {tiny_visual_checkpoint.name} in" in log
    assert "objects of the start-up frozen out of the garbage collector's reach" in log
    assert f"prefill chunk {chunk} tokens a step (decode step" in log


def test_serve_command_errors_are_one_line(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "visualglm", "serve", "--model", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.startswith("visualglm serve: error:") and "Traceback" not in result.stderr


def test_start_up_objects_are_frozen_and_later_ones_still_collected() -> None:
    import gc

    from visualglm.serving import freeze_startup_objects

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    gc.collect()  # the garbage earlier tests left: the freeze collects it first
    tracked = len(gc.get_objects())
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= tracked * 0.9
        before = len(gc.get_objects())
        assert before < tracked / 10  # a full collection now walks only what came after
        Cycle()  # garbage that only the cycle collector frees
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
