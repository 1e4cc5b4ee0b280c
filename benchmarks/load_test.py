"""Bounded load test of ``visualglm serve``: starts a local server, sends a mix of requests, prints figures.

    python benchmarks/load_test.py                      # tiny random VisualGLM checkpoint (written to a temp dir)
    python benchmarks/load_test.py --model visualglm-demo --requests 200 --concurrency 8
    python benchmarks/load_test.py --model visualglm-demo --max-batch 1   # one request at a time

The mix cycles through: reference ``POST /`` (text, and with a base64 image), OpenAI chat completions
(plain, streaming, streaming with an image data URL) and invalid requests (each must get its 4xx). A
request "fails unexpectedly" when its status is not the one its kind expects, when it raises, or when a
stream does not end with ``data: [DONE]``. Prints successes, errors by status, latency p50/p95 (and time
to first chunk for streams), throughput, and the server's RSS after start-up, after warm-up and at the end.
The server binds 127.0.0.1 only. Exit status 1 on any unexpected failure.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil


@dataclass
class Result:
    kind: str
    status: int | None
    expected: bool
    seconds: float
    first_chunk_s: float | None = None
    completion_tokens: int = 0
    error: str = ""


def _png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_kinds(max_tokens: int) -> list[tuple[str, str, dict, bool, set[int]]]:
    """(kind, path, body, stream, expected statuses) in the order they are cycled through."""
    image = base64.b64encode(_png((200, 40, 40))).decode()
    data_url = "data:image/png;base64," + base64.b64encode(_png((40, 40, 200))).decode()
    user = [{"role": "user", "content": "What is in the image?"}]
    with_image = [{"role": "user", "content": [{"type": "text", "text": "What colour is the shape?"},
                                               {"type": "image_url", "image_url": {"url": data_url}}]}]
    openai = {"model": "m", "max_tokens": max_tokens}
    return [
        ("legacy", "/", {"text": "你好", "history": [], "max_length": 64 + max_tokens}, False, {200}),
        ("legacy+image", "/", {"text": "描述这张图片。", "image": image, "history": [["你好", "你好！"]],
                               "max_length": 128 + max_tokens}, False, {200}),
        ("openai", "/v1/chat/completions", {**openai, "messages": user}, False, {200}),
        ("openai-stream", "/v1/chat/completions", {**openai, "messages": user, "stream": True,
                                                   "stream_options": {"include_usage": True}}, True, {200}),
        ("openai-stream+image", "/v1/chat/completions", {**openai, "messages": with_image, "stream": True,
                                                         "stream_options": {"include_usage": True}}, True, {200}),
        ("openai", "/v1/chat/completions", {**openai, "messages": user, "temperature": 0}, False, {200}),
        ("invalid:temperature", "/v1/chat/completions", {**openai, "messages": user, "temperature": 9}, False, {400}),
        ("invalid:image", "/", {"text": "x", "image": "bm90IGFuIGltYWdl"}, False, {400}),
        ("invalid:max_tokens", "/v1/chat/completions", {**openai, "messages": user, "max_tokens": 10**6}, False,
         {400}),
        ("invalid:json", "/v1/chat/completions", "{not json", False, {400}),
    ]


def send(client: httpx.Client, kind: str, path: str, body, stream: bool, expected: set[int]) -> Result:
    started = time.perf_counter()
    content = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    headers = {"content-type": "application/json"}
    try:
        if not stream:
            response = client.post(path, content=content, headers=headers)
            tokens = 0
            if response.status_code == 200 and "usage" in response.json():
                tokens = response.json()["usage"]["completion_tokens"]
            return Result(kind, response.status_code, response.status_code in expected,
                          time.perf_counter() - started, completion_tokens=tokens)
        first, tokens, lines = None, 0, []
        with client.stream("POST", path, content=content, headers=headers) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                first = first or time.perf_counter() - started
                lines.append(line)
                if line.startswith("data: {") and '"usage"' in line:
                    tokens = json.loads(line[6:]).get("usage", {}).get("completion_tokens", 0)
        ok = response.status_code in expected and (response.status_code != 200 or lines[-1:] == ["data: [DONE]"])
        return Result(kind, response.status_code, ok, time.perf_counter() - started, first, tokens)
    except Exception as exc:  # a transport error is an unexpected failure, recorded, not raised
        return Result(kind, None, False, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(model: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "visualglm", "serve", "--model", model, "--host", "127.0.0.1", "--port",
               str(port), "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch),
               "--max-new-tokens", str(max(args.max_tokens, 64)), "--log-level", "warning"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_ready(client: httpx.Client, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{server.stderr.read()}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: a tiny random VisualGLM "
                        "checkpoint; `visualglm-demo` for the shipped demo model)")
    parser.add_argument("--requests", type=int, default=200, help="requests to send (default: 200)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per request (default: 16)")
    parser.add_argument("--max-queue", type=int, default=16, help="server queue size (default: 16)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="server's --max-batch: requests generated together (default: 8; 1 = one at a time)")
    parser.add_argument("--warmup", type=int, default=10, help="requests before the RSS baseline (default: 10)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from visualglm.checkpoint.tiny import write_tiny_random_checkpoint

            model = str(write_tiny_random_checkpoint(Path(tmp) / "tiny-visualglm", family="visualglm"))
        port = _free_port()
        server = start_server(model, port, args)
        kinds = request_kinds(args.max_tokens)
        limits = httpx.Limits(max_connections=args.concurrency + 2)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
                wait_ready(client, server)
                process = psutil.Process(server.pid)
                rss_loaded = process.memory_info().rss
                for i in range(args.warmup):
                    send(client, *kinds[i % len(kinds)])
                rss_before = process.memory_info().rss
                started = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    results = list(pool.map(lambda i: send(client, *kinds[i % len(kinds)]), range(args.requests)))
                elapsed = time.perf_counter() - started
                rss_after = process.memory_info().rss
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    report(results, elapsed, rss_loaded, rss_before, rss_after, args, model)
    return 0 if all(r.expected for r in results) else 1


def report(results: list[Result], elapsed: float, rss_loaded: int, rss_before: int, rss_after: int,
           args: argparse.Namespace, model: str) -> None:
    mib = 2**20
    unexpected = [r for r in results if not r.expected]
    by_status = Counter(r.status for r in results)
    ok = [r for r in results if r.status == 200 and r.expected]
    latencies = [r.seconds for r in ok]
    firsts = [r.first_chunk_s for r in ok if r.first_chunk_s is not None]
    tokens = sum(r.completion_tokens for r in results)
    print(f"model: {model}")
    print(f"requests: {len(results)} ({args.concurrency} at a time, max_tokens {args.max_tokens}, server max-batch "
          f"{args.max_batch}) in {elapsed:.1f} s")
    print(f"successes (200): {len(ok)}; expected 4xx: {sum(1 for r in results if r.expected and r.status != 200)}; "
          f"unexpected failures: {len(unexpected)}")
    print("by status: " + ", ".join(f"{status}: {count}" for status, count in sorted(by_status.items(), key=str)))
    for kind, count in sorted(Counter(r.kind for r in unexpected).items()):
        example = next(r for r in unexpected if r.kind == kind)
        print(f"  unexpected {kind}: {count} (e.g. status {example.status} {example.error})")
    print(f"latency of successes: p50 {statistics.median(latencies) if latencies else float('nan'):.3f} s, "
          f"p95 {percentile(latencies, 0.95):.3f} s; streams' first chunk p50 {percentile(firsts, 0.5):.3f} s")
    print(f"throughput: {len(results) / elapsed:.2f} requests/s, {tokens / elapsed:.1f} answer tokens/s "
          f"(OpenAI requests' usage)")
    growth = (rss_after - rss_before) / rss_before * 100
    print(f"server RSS: {rss_loaded / mib:.0f} MiB loaded, {rss_before / mib:.0f} MiB after warm-up, "
          f"{rss_after / mib:.0f} MiB after the run ({growth:+.1f}%)")


if __name__ == "__main__":
    sys.exit(main())
