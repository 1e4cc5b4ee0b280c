"""Live servers for the serving tests: the FastAPI app under uvicorn on 127.0.0.1, in a thread."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from visualglm.serving.protocol import ServeLimits  # noqa: E402
from visualglm.serving.worker import Worker  # noqa: E402

# Small answers keep every request fast on a 2-core CPU. A fixed prefill chunk (the default is measured at
# start-up, so it depends on the machine) keeps the batching the tests look at the same everywhere.
TEST_LIMITS = ServeLimits(max_new_tokens=32, max_queue=4, max_body_bytes=2 * 2**20, max_image_bytes=2**20,
                          max_image_pixels=1_000_000, max_text_chars=4000, max_history_turns=8,
                          max_prompt_tokens=400, prefill_chunk=32)


@contextmanager
def serve_app(app, limits: ServeLimits = TEST_LIMITS) -> Iterator[str]:
    """Run ``app`` on a free 127.0.0.1 port, with the connection limits of ``limits``, as ``visualglm
    serve`` does; yields the base URL."""
    import uvicorn

    from visualglm.serving.connections import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, limits, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def running(model_and_tokenizer, *, limits: ServeLimits = TEST_LIMITS, name: str = "tiny", **app_options
            ) -> Iterator[tuple[str, Worker]]:
    """A started worker over the shared tiny model, served; stopped afterwards."""
    from visualglm.serving.api import create_app

    model, tokenizer = model_and_tokenizer
    worker = Worker(model, tokenizer, name=name, limits=limits).start()
    try:
        with serve_app(create_app(worker, **app_options), limits) as url:
            yield url, worker
    finally:
        worker.stop()


def _load(path: Path):
    from visualglm.checkpoint.load import load
    from visualglm.checkpoint.tokenizer import load_tokenizer

    return load(path), load_tokenizer(path)


@pytest.fixture(scope="session")
def visual_model(tiny_visual_checkpoint):
    return _load(tiny_visual_checkpoint)


@pytest.fixture(scope="session")
def text_model(tiny_chat_checkpoint):
    return _load(tiny_chat_checkpoint)


@pytest.fixture(scope="module")
def server(visual_model) -> Iterator[tuple[str, Worker]]:
    """The tiny VisualGLM model served with the test limits, no API key."""
    with running(visual_model) as served:
        yield served


def png_bytes(color=(200, 30, 30), size=(40, 30), fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class ForwardProbe:
    """Counts ``model``'s forward passes, can slow each one down, and can hold them at a gate."""

    def __init__(self, seconds_per_forward: float = 0.0, gated: bool = False) -> None:
        self.calls = 0
        self.delay = seconds_per_forward
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, *_) -> None:
        self.gate.wait(30)
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)


@contextmanager
def probe(model, seconds_per_forward: float = 0.0, gated: bool = False) -> Iterator[ForwardProbe]:
    """Install a :class:`ForwardProbe` on ``model`` for the duration of the block."""
    hook = ForwardProbe(seconds_per_forward, gated)
    handle = model.register_forward_pre_hook(hook)
    try:
        yield hook
    finally:
        hook.gate.set()
        handle.remove()
