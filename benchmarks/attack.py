"""Bounded attacks on a real ``visualglm serve`` (and ``visualglm web``) on 127.0.0.1; prints what held.

    python benchmarks/attack.py                   # the shipped demo model, default limits
    python benchmarks/attack.py --only bodies,slow-headers
    python benchmarks/attack.py --web             # also the web UI's own routes

Each attack runs for a bounded time with a bounded number of connections, loopback only, while a separate
client polls ``GET /health`` every 20 ms. Per attack it prints the statuses the attack got, the worst
``/health`` latency, the server's RSS before and after, and the number of tracebacks the server logged. An
attack "held" when no response had a status >= 500 (the deliberate ``503 + Retry-After`` of an overloaded
queue or connection cap is counted apart), no traceback was logged, ``/health`` always answered within
100 ms and RSS grew by less than 300 MiB. Exit status 1 when any attack did not hold.

Classes (``--only`` takes their names): numeric (sampling values at the float limits, batched with valid
requests), bodies (32 MiB JSON of millions of containers, 27 MiB base64 strings), slow-headers, slow-body,
silent (connections that send nothing), flood (3x max-connections idle connections), images (1 x 25,000,000
PNG strips, 25 Mpx images at the limit), paths (file paths as image sources), small (lone surrogates,
duplicate Authorization headers, percent-encoded hosts).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

HEALTH_BOUND_S = 0.100
RSS_BOUND_MIB = 300


@dataclass
class Outcome:
    name: str
    statuses: Counter = field(default_factory=Counter)
    worst_health_s: float = 0.0
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    tracebacks: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if isinstance(status, int) and status >= 500
                   and status != 503)

    @property
    def held(self) -> bool:
        return (self.server_errors == 0 and self.tracebacks == 0 and self.worst_health_s < HEALTH_BOUND_S
                and self.rss_after_mib - self.rss_before_mib < RSS_BOUND_MIB and not any(
                    n.startswith("FAIL") for n in self.notes))


class Server:
    """``visualglm <command>`` in a subprocess on a free 127.0.0.1 port, stderr to a log file."""

    def __init__(self, command: str, extra: list[str], log: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        exe = Path(sys.executable).with_name("visualglm")
        self.process = subprocess.Popen([str(exe), command, "--host", "127.0.0.1", "--port", str(self.port), *extra],
                                        stdout=subprocess.DEVNULL, stderr=log.open("w"))
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + ("/health" if command == "serve" else "/"), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 300 s")
            time.sleep(0.3)

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


_PROBE = """
import sys, threading, time, httpx
url, stop, worst, failures = sys.argv[1], threading.Event(), 0.0, 0
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
with httpx.Client(timeout=10) as client:
    while not stop.is_set():
        start = time.monotonic()
        try:
            ok = client.get(url).status_code == 200
        except httpx.HTTPError:
            ok = False
        worst, failures = max(worst, time.monotonic() - start), failures + (not ok)
        time.sleep(0.02)
print(worst, failures)
"""


class HealthProbe:
    """Polls ``url`` every 20 ms and keeps the worst latency, in its own process: the attacks' client-side
    work (building 32 MiB bodies) must not delay the probe's own requests."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self.failures = 0

    def __enter__(self) -> HealthProbe:
        self._process = subprocess.Popen([sys.executable, "-c", _PROBE, self.url], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._process.communicate("", timeout=30)
        worst, failures = out.split()
        self.worst, self.failures = float(worst), int(failures)


def run_attack(name: str, server: Server, attack: Callable[[Outcome], None], health_path: str) -> Outcome:
    outcome = Outcome(name)
    time.sleep(0.5)
    outcome.rss_before_mib = server.rss_mib()
    tracebacks = server.tracebacks()
    start = time.monotonic()
    with HealthProbe(server.url + health_path) as probe:
        attack(outcome)
    outcome.seconds = time.monotonic() - start
    time.sleep(1.0)
    outcome.worst_health_s = probe.worst
    if probe.failures:
        outcome.notes.append(f"FAIL: /health failed {probe.failures} times")
    outcome.rss_after_mib = server.rss_mib()
    outcome.tracebacks = server.tracebacks() - tracebacks
    return outcome


# ------------------------------------------------------------------------------------------------ payloads


def _png(size: tuple[int, int], noise: bool = False) -> bytes:
    from PIL import Image

    if noise:
        image = Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))
    else:
        image = Image.new("RGB", size, (120, 30, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_strip(width: int, height: int) -> bytes:
    """A real, fully decodable PNG of ``width x height`` (all zeros), compressed to a few hundred KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = (b"\x00" + b"\x00" * (3 * width)) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _chat(content, **fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 16, **fields}


def _post(url: str, outcome: Outcome, path: str, **kwargs) -> httpx.Response | None:
    try:
        response = httpx.post(url + path, timeout=120, **kwargs)
    except httpx.HTTPError as exc:
        outcome.statuses[type(exc).__name__] += 1
        return None
    outcome.statuses[response.status_code] += 1
    return response


# ------------------------------------------------------------------------------------------------- attacks


def attack_numeric(server: Server, outcome: Outcome) -> None:
    poisons = [{"temperature": 1e-300}, {"temperature": 1e-39}, {"temperature": 5e-324},
               {"repetition_penalty": 1e-300}, {"top_p": 5e-324}, {"temperature": 1e-300, "top_p": 5e-324}]
    jobs = []
    for i in range(35):
        jobs.append(("/v1/chat/completions", _chat(f"What colour is shape number {i}?", temperature=0)))
        if i % 5 == 0:
            poison = poisons[(i // 5) % len(poisons)]
            jobs.append(("/v1/chat/completions", _chat("What shape is it?", **poison)))
            jobs.append(("/", {"text": "What shape is it?", **poison}))
            jobs.append(("/v1/chat/completions", _chat("Describe it.", stream=True, **poison)))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: _post(server.url, outcome, job[0], json=job[1]), jobs))


def attack_bodies(server: Server, outcome: Outcome) -> None:
    size = 32 * 2**20
    bomb = b"[" + b"[]," * ((size - 10) // 3) + b"[]]"
    payload = base64.b64encode(random.Random(1).randbytes(20 * 2**20 - 64)).decode()
    big_string = json.dumps(_chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}},
                                   {"type": "text", "text": "what is it?"}])).encode()
    legacy_string = json.dumps({"text": "what is it?", "image": payload}).encode()
    bodies = [bomb, bomb, big_string, legacy_string] * 2
    paths = ["/v1/chat/completions", "/", "/v1/chat/completions", "/"] * 2
    pairs = list(zip(paths, bodies, strict=True))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda pair: _post(server.url, outcome, pair[0], content=pair[1],
                                         headers={"content-type": "application/json"}), pairs))


def _trickle(server: Server, outcome: Outcome, head: bytes, then: bytes, count: int, every_s: float,
             limit_s: float, expect_close_s: float) -> None:
    """``count`` connections send ``head`` then one byte of ``then`` every ``every_s`` seconds; each must be
    closed by the server within ``expect_close_s`` seconds."""
    def one(_: int) -> float | None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            start = time.monotonic()
            try:
                if head:
                    sock.sendall(head)
                for byte in then:
                    if time.monotonic() - start > limit_s:
                        return None
                    sock.sendall(bytes([byte]))
                    sock.settimeout(every_s)
                    try:
                        if sock.recv(65536) == b"":
                            return time.monotonic() - start
                    except TimeoutError:
                        continue
                    sock.settimeout(limit_s)
                    while sock.recv(65536):
                        pass
                    return time.monotonic() - start
            except OSError:  # reset or broken pipe: closed by the server
                return time.monotonic() - start
            return None

    with ThreadPoolExecutor(count) as pool:
        closed = list(pool.map(one, range(count)))
    still_open = sum(1 for t in closed if t is None)
    slowest = max((t for t in closed if t is not None), default=0.0)
    outcome.statuses["closed"] += count - still_open
    outcome.notes.append(f"{count - still_open}/{count} closed by the server, the last after {slowest:.1f} s")
    if still_open or slowest > expect_close_s:
        outcome.notes.append(f"FAIL: {still_open} still open after {limit_s:.0f} s")


def attack_slow_headers(server: Server, outcome: Outcome, header_timeout: float) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    _trickle(server, outcome, head, b"X-Slow: " + b"a" * 200, 50, 2.0, header_timeout + 20, header_timeout + 3)


def attack_slow_body(server: Server, outcome: Outcome, body_timeout: float) -> None:
    head = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 33554432\r\n\r\n")
    _trickle(server, outcome, head, b"{" + b" " * 400, 20, 2.0, body_timeout + 20, body_timeout + 3)


def attack_silent(server: Server, outcome: Outcome, header_timeout: float) -> None:
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(50)]
    start = time.monotonic()
    closed_at: list[float] = []
    for sock in socks:
        sock.settimeout(max(0.1, header_timeout + 20 - (time.monotonic() - start)))
        try:
            data = sock.recv(65536)
            while data:
                outcome.statuses[data.split(b" ")[1].decode() if data.startswith(b"HTTP/") else "data"] += 1
                data = sock.recv(65536)
            closed_at.append(time.monotonic() - start)
        except TimeoutError:
            pass
        except OSError:
            closed_at.append(time.monotonic() - start)
        sock.close()
    outcome.notes.append(f"{len(closed_at)}/50 closed by the server, the last after {max(closed_at, default=0):.1f} s")
    if len(closed_at) < 50:
        outcome.notes.append("FAIL: silent connections left open")


def attack_flood(server: Server, outcome: Outcome, max_connections: int) -> None:
    socks = []
    for _ in range(3 * max_connections):
        try:
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        except OSError as exc:
            outcome.statuses[type(exc).__name__] += 1
    ok = 0
    for _ in range(20):  # real clients while the flood sits there
        response = httpx.get(server.url + "/v1/models", timeout=10)
        outcome.statuses[response.status_code] += 1
        ok += response.status_code == 200
    open_now = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            open_now += sock.recv(1) != b""  # b"": the server closed it
        except BlockingIOError:  # nothing to read: still open
            open_now += 1
        except OSError:
            pass
        sock.close()
    outcome.notes.append(f"{len(socks)} idle connections opened, {open_now} still open at the end "
                         f"(cap {max_connections}); {ok}/20 real requests answered")
    if ok < 20 or open_now > max_connections:
        outcome.notes.append("FAIL: the flood locked out clients or exceeded the cap")


def attack_images(server: Server, outcome: Outcome) -> None:
    strip = _data_url(_png_strip(1, 25_000_000))
    large = _data_url(_png_strip(5000, 5000))  # at the pixel limit, decodable, small on the wire
    outcome.notes.append(f"1x25,000,000 PNG: {len(strip) * 3 // 4 // 1024} KB; 5000x5000 PNG: "
                         f"{len(large) * 3 // 4 // 1024} KB")
    jobs = [("/v1/chat/completions", _chat([{"type": "image_url", "image_url": {"url": strip}},
                                             {"type": "text", "text": "what is it?"}]))] * 4
    jobs += [("/", {"text": "what is it?", "image": large.split(",", 1)[1]})] * 4
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: _post(server.url, outcome, job[0], json=job[1]), jobs))
    outcome.notes.append(f"8 image requests in {time.monotonic() - start:.1f} s")


def attack_paths(server: Server, outcome: Outcome) -> None:
    messages = set()
    for path in ("/etc/passwd", "/etc/no-such-file", "/etc/hosts", "/proc/self/environ", "/nonexistent/x.png",
                 "file:///etc/passwd", "../../etc/passwd", "/etc/passwd.png"):
        for route, body in (("/", {"text": "x", "image": path}),
                            ("/v1/chat/completions", _chat([{"type": "image_url", "image_url": {"url": path}}]))):
            response = _post(server.url, outcome, route, json=body)
            if response is not None and response.status_code == 400:
                messages.add((path.count("/"), "." in path, response.json()["error"]["message"]))
    # A message may depend on the string's own shape (base64 alphabet or not), never on what exists on disk.
    by_shape: dict[tuple, set] = {}
    for count, dotted, message in messages:
        by_shape.setdefault((count, dotted), set()).add(message)
    outcome.notes.append(f"{len(messages)} distinct (shape, message) pairs for 8 paths")
    if sum(1 for m in messages if "no such file" in m[2] or "not allowed" in m[2]):
        outcome.notes.append("FAIL: a message reveals the filesystem")


def attack_small(server: Server, outcome: Outcome) -> None:
    raw = json.dumps(_chat("hi")).encode()[:-1] + b', "stop": ["\\ud800"]}'
    _post(server.url, outcome, "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    for host in ("%31%32%37.0.0.1", "2002:7f00:1::", "[2002:a9fe:a9fe::]", "[fec0::1]", "127.1", "[64:ff9b::7f00:1]"):
        _post(server.url, outcome, "/v1/chat/completions",
              json=_chat([{"type": "image_url", "image_url": {"url": f"http://{host}/a.png"}}]))
    response = httpx.get(server.url + "/v1/models", timeout=10,
                         headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")])
    outcome.statuses[response.status_code] += 1


def attack_web(server: Server, outcome: Outcome) -> None:
    size = 32 * 2**20
    bomb = b"[" + b"[]," * ((size - 10) // 3) + b"[]]"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: _post(server.url, outcome, "/gradio_api/queue/join", content=bomb,
                                      headers={"content-type": "application/json"}), range(4)))
    attack_slow_headers(server, outcome, 10.0)


ATTACKS = ("numeric", "bodies", "slow-headers", "slow-body", "silent", "flood", "images", "paths", "small")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: the shipped demo model)")
    parser.add_argument("--only", default=",".join(ATTACKS), help=f"comma-separated attacks ({', '.join(ATTACKS)})")
    parser.add_argument("--web", action="store_true", help="also attack `visualglm web` (JSON bombs, slow headers)")
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--body-timeout", type=float, default=30.0)
    parser.add_argument("--max-connections", type=int, default=100)
    args = parser.parse_args()
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attacks: {', '.join(unknown)}")
    extra = (["--model", args.model] if args.model else []) + [
        "--header-timeout", str(args.header_timeout), "--body-timeout", str(args.body_timeout),
        "--max-connections", str(args.max_connections)]
    log_dir = Path(tempfile.mkdtemp(prefix="visualglm-attack-"))
    print(f"machine: {os.cpu_count()} CPUs; server logs in {log_dir}", flush=True)
    outcomes: list[Outcome] = []
    server = Server("serve", [*extra, "--log-level", "warning"], log_dir / "serve.log")
    try:
        table = {
            "numeric": lambda o: attack_numeric(server, o),
            "bodies": lambda o: attack_bodies(server, o),
            "slow-headers": lambda o: attack_slow_headers(server, o, args.header_timeout),
            "slow-body": lambda o: attack_slow_body(server, o, args.body_timeout),
            "silent": lambda o: attack_silent(server, o, args.header_timeout),
            "flood": lambda o: attack_flood(server, o, args.max_connections),
            "images": lambda o: attack_images(server, o),
            "paths": lambda o: attack_paths(server, o),
            "small": lambda o: attack_small(server, o),
        }
        for name in wanted:
            outcomes.append(run_attack(name, server, table[name], "/health"))
            _print(outcomes[-1])
    finally:
        server.stop()
    if args.web:
        web = Server("web", extra, log_dir / "web.log")
        try:
            outcomes.append(run_attack("web", web, lambda o: attack_web(web, o), "/health"))
            _print(outcomes[-1])
        finally:
            web.stop()
    held = all(outcome.held for outcome in outcomes)
    print(f"\n{sum(o.held for o in outcomes)}/{len(outcomes)} attacks held "
          f"(no 5xx but deliberate 503s, no traceback, /health < {HEALTH_BOUND_S * 1000:.0f} ms, "
          f"RSS growth < {RSS_BOUND_MIB} MiB)")
    return 0 if held else 1


def _print(outcome: Outcome) -> None:
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(outcome.statuses.items(), key=str))
    print(f"\n[{'held' if outcome.held else 'FAILED'}] {outcome.name} ({outcome.seconds:.1f} s)\n"
          f"  statuses {{{statuses}}}; 5xx (not 503): {outcome.server_errors}; tracebacks: {outcome.tracebacks}\n"
          f"  worst /health {outcome.worst_health_s * 1000:.0f} ms; RSS {outcome.rss_before_mib:.0f} -> "
          f"{outcome.rss_after_mib:.0f} MiB ({outcome.rss_after_mib - outcome.rss_before_mib:+.0f})", flush=True)
    for note in outcome.notes:
        print(f"  {note}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
