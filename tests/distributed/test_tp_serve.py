"""``visualglm serve --tp 2`` on CPU (gloo): rank 0 serves HTTP and leads, rank 1 follows its batches; the
greedy answers equal a single-process server's, and stopping the launcher stops every process."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO_ROOT

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from tests.serving.conftest import TEST_LIMITS, _load, running  # noqa: E402

# Under torch.distributed.run's 30 s grace before it kills the ranks: a follower that missed the stop
# message would still be there.
SHUTDOWN_S = 20


def _png(color) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _requests() -> list[tuple[str, dict]]:
    image = _png((30, 160, 40))
    user = [{"role": "user", "content": "what is in the picture?"}]
    with_image = [{"role": "user", "content": [
        {"type": "text", "text": "describe it"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]
    chat = {"model": "tiny", "temperature": 0}
    return [
        ("/", {"text": "你好", "max_length": 60, "temperature": 0}),
        ("/", {"text": "what colour is it?", "image": image, "max_length": 120, "temperature": 0}),
        ("/v1/chat/completions", {**chat, "messages": user, "max_tokens": 7}),
        ("/v1/chat/completions", {**chat, "messages": with_image, "max_tokens": 11, "stream": True}),
        ("/v1/chat/completions", {**chat, "messages": user, "max_tokens": 20, "stop": ["zz"]}),
    ]


def _answer(client: httpx.Client, path: str, body: dict) -> tuple[int, str, str | None]:
    """(status, answer text, finish reason) of one request, streaming or not."""
    if body.get("stream"):
        text, finish = "", None
        with client.stream("POST", path, json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
        return response.status_code, text, finish
    response = client.post(path, json=body)
    data = response.json()
    if path == "/":
        return response.status_code, data.get("result"), None
    return response.status_code, data["choices"][0]["message"]["content"], data["choices"][0]["finish_reason"]


def _one_by_one(url: str) -> list[tuple[int, str, str | None]]:
    """Send every request after the previous one's answer: each runs alone, so its batch is the same under
    any server (a concurrent batch's composition depends on arrival times, and a different batch can move
    fp32 results by rounding noise, enough to flip a near-tie of a random model's greedy choice)."""
    with httpx.Client(base_url=url, timeout=120) as client:
        return [_answer(client, *request) for request in _requests()]


def _all_at_once(url: str) -> list[tuple[int, str, str | None]]:
    """Send every request concurrently (so that the server batches them); answers in request order."""
    requests = _requests()
    answers: list = [None] * len(requests)
    with httpx.Client(base_url=url, timeout=120) as client:
        def send(index: int) -> None:
            answers[index] = _answer(client, *requests[index])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    return answers


def _start(checkpoint, **popen) -> tuple[subprocess.Popen, str, list[psutil.Process]]:
    """``visualglm serve --tp 2`` on a free port; returns the launcher, the URL once /health answers, and
    the launcher with all its descendants (torch.distributed.run and the two ranks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "visualglm", "serve", "--tp", "2", "--model", str(checkpoint),
         "--port", str(port), "--max-new-tokens", str(TEST_LIMITS.max_new_tokens), "--max-prompt-tokens", "400",
         "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if launcher.poll() is not None:
            raise AssertionError(launcher.communicate()[1][-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            launcher.kill()
            raise AssertionError("the server did not start")
        time.sleep(0.2)
    processes = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    ranks = [p for p in processes[1:] if "torch.distributed.run" not in " ".join(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in processes]
    return launcher, url, processes


def _assert_clean_exit(launcher: subprocess.Popen) -> None:
    """A requested stop is a success: exit status 0 and no traceback (rank 0 shut down gracefully, told the
    others to stop, and torch.distributed.run saw both end)."""
    _, err = launcher.communicate(timeout=10)
    assert launcher.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "exitcode" not in err, err[-3000:]


def _kill_leftovers(launcher: subprocess.Popen, processes: list[psutil.Process]) -> None:
    for process in processes:
        if process.is_running():
            process.kill()
    if launcher.poll() is None:
        launcher.kill()


def test_serve_under_two_ranks_answers_like_one_process(tiny_visual_checkpoint) -> None:
    launcher, url, processes = _start(tiny_visual_checkpoint)
    try:
        parallel = _one_by_one(url)  # first, on fresh caches, as the single process below
        batched = _all_at_once(url)  # the ranks replay one concurrent schedule
        # A bad request is refused by rank 0 alone, and the ranks stay in step afterwards.
        refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 600}]},
                             timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        again = _all_at_once(url)
        # Stopping the launcher (SIGTERM, as a service manager does) stops both ranks.
        launcher.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=SHUTDOWN_S)
        assert not alive, f"still running: {[p.cmdline() for p in alive]}"
        _assert_clean_exit(launcher)
    finally:
        _kill_leftovers(launcher, processes)
    with running(_load(tiny_visual_checkpoint)) as (single_url, _):
        single = _one_by_one(single_url)
    assert all(status == 200 for status, _, _ in single)
    assert parallel == single
    # Concurrent batches: their composition depends on arrival times, and the engine reuses cached prompts
    # (prefilled in other groups), so their text may differ from the above by a flipped near-tie.
    for answers in (batched, again):
        assert [status for status, _, _ in answers] == [200] * len(single) and all(t for _, t, _ in answers)
    assert {finish for _, _, finish in single} >= {"length"}


def test_ctrl_c_stops_every_rank(tiny_visual_checkpoint) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group: launcher, torchrun and ranks."""
    launcher, url, processes = _start(tiny_visual_checkpoint, start_new_session=True)
    try:
        assert httpx.post(f"{url}/", json={"text": "hi", "max_length": 30}, timeout=60).status_code == 200
        os.killpg(launcher.pid, signal.SIGINT)
        _, alive = psutil.wait_procs(processes, timeout=SHUTDOWN_S)
        assert not alive, f"still running: {[p.cmdline() for p in alive]}"
        _assert_clean_exit(launcher)
    finally:
        _kill_leftovers(launcher, processes)


class RecordingChannel:
    """Stands in for the Leader: records what rank 0's worker would send, in order."""

    heartbeat_s = 0.05

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def send_step(self, shape, newcomers, ended) -> None:
        self.calls.append(("step", shape, [request.seed for request, _ in newcomers],
                           [image is not None for _, image in newcomers], list(ended)))

    def heartbeat(self) -> None:
        self.calls.append(("heartbeat",))

    def close(self) -> None:
        self.calls.append(("close",))


def test_the_leader_side_heartbeats_when_idle_and_sends_every_step(tiny_visual_checkpoint) -> None:
    from PIL import Image

    from visualglm.generation.step_costs import PROBE_CHUNK
    from visualglm.serving.worker import GenerationRequest, Worker

    channel = RecordingChannel()
    limits = dataclasses.replace(TEST_LIMITS, prefill_chunk=None)  # measured: its steps are sent too
    worker = Worker(*_load(tiny_visual_checkpoint), limits=limits, channel=channel)
    done = [threading.Event(), threading.Event()]
    requests = [GenerationRequest("hi", sampling={"do_sample": False}, max_new_tokens=3),
                GenerationRequest("look", image=Image.new("RGB", (8, 8)), max_new_tokens=2,
                                  sampling={"seed": 5})]
    for request, event in zip(requests, done, strict=True):
        worker.submit(request, lambda e, event=event: event.set() if e.kind in ("done", "error") else None)
    worker.start()
    assert all(event.wait(60) for event in done)
    time.sleep(0.3)  # idle: heartbeats
    worker.stop()
    kinds = [call[0] for call in channel.calls]
    assert kinds[-1] == "close" and kinds.count("heartbeat") >= 2
    steps = [call for call in channel.calls if call[0] == "step"]
    # First the steps that measure the step costs (synthetic text prompts, the probe's chunk), which the
    # followers replay; then one step brings both newcomers (their seeds: rank 0 picked one for the unseeded
    # request, with its image flag), every step from then on carries the measured engine's shape, and the
    # steps ran until both rows had ended.
    first = next(index for index, call in enumerate(steps) if 5 in call[2])
    measuring, serving = steps[:first], steps[first:]
    assert worker.step_costs is not None and len(measuring) > 10
    assert all(call[1][2] == PROBE_CHUNK and not any(call[3]) for call in measuring)
    assert serving[0][2][1] == 5 and isinstance(serving[0][2][0], int) and serving[0][3] == [False, True]
    assert all(call[1] == worker.engine_shape for call in serving)
    assert measuring[-1][1][3] != serving[0][1][3]  # a new build: every rank starts the served engine empty
    assert sum(len(call[2]) for call in serving) == 2
    assert kinds.index("heartbeat") > kinds.index("step")
