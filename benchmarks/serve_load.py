"""Open-loop load on a real ``visualglm serve`` (127.0.0.1): continuous versus static batching.

    python -m benchmarks.serve_load                      # the shipped demo model and a 151M random ChatGLM
    python -m benchmarks.serve_load --models mid --schedulers continuous
    python -m benchmarks.serve_load --models mid --requests 60

For each model and scheduler (``--scheduler continuous|static`` of the server) it measures, with streamed
OpenAI chat completions whose answers run to their ``max_tokens`` (random weights rarely stop early):

1. **unloaded**: one stream of 64 tokens alone: its time between tokens (TBT) is the unloaded step time and
   its time to first token (TTFT) the prefill alone;
2. **8 long answers**: 8 concurrent streams of 256 tokens: answer tokens/s against the single stream;
3. **newcomers**: five short requests sent one at a time while 7 long answers stream: their median (and
   largest) TTFT against the prefill alone plus 2 loaded decode steps;
4. **capacity**: 8 clients sending mixed requests back to back (prompts of about 16, 128 and 512 tokens,
   answers of 16, 64 and 192 tokens): completed requests/s while all 8 are busy;
5. **Poisson**: open-loop arrivals of the same mix at 40% and 80% of that capacity: throughput, TTFT
   p50/p95 (of all requests and of the short prompts alone), TBT p50/p95. The TBT p95 is set against the
   unloaded step of step 1 and against one measured again just before and just after the phase (a
   32-token stream alone each time, their mean): a small virtual machine's speed moves by a quarter between
   minutes (unloaded steps of 18 to 27 ms in one hour on the GLM-4 shape), which a ratio to a step
   measured minutes earlier reads as a change of the server.

Every figure is printed; nothing is asserted. Answers are read as server-sent events: a chunk's arrival
time is its token's (the detokenizer may hold a piece back for a step, which shows as a longer gap).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.attack import Server
from visualglm import load_tokenizer
from visualglm.demo import resolve_model

WORDS = ("red", "green", "blue", "circle", "square", "shape", "colour", "image", "small", "large", "left", "right")
MID_SHAPE = dict(hidden_size=1024, num_layers=12, num_attention_heads=16, inner_hidden_size=4096)  # 151M
# GLM-4V-9B's decoder at the same size: grouped keys/values (2 groups for 16 heads), so a cached token holds
# 7 KB of keys/values against the ChatGLM shape's 48 KB.
GLM4_SHAPE = dict(hidden_size=1024, num_layers=14, num_attention_heads=16, kv_channels=64, multi_query_group_num=2,
                  ffn_hidden_size=2816)  # 154M
PROMPTS = (16, 128, 512)  # prompt tokens (of the model's tokenizer, template included roughly)
ANSWERS = (16, 64, 192)  # tokens


@dataclass
class Stream:
    """One streamed answer: when it was sent, when each content chunk came, its status."""

    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)
    status: int | None = None
    tokens: int | None = None  # completion tokens, as the final usage chunk counts them

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


class Prompts:
    """Random texts of about a given number of tokens of ``tokenizer``."""

    def __init__(self, tokenizer, rng: random.Random) -> None:
        self.tokenizer, self.rng = tokenizer, rng

    def __call__(self, tokens: int) -> str:
        words: list[str] = []
        while len(self.tokenizer.encode(" ".join(words))) < tokens:
            words.append(self.rng.choice(WORDS))
        return " ".join(words)


def stream(url: str, prompt: str, max_tokens: int) -> Stream:
    """One streamed chat completion. Read with the standard library's ``http.client`` (a buffered line
    reader, one small JSON parse per event): the client shares the server's cores, so it is kept light."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "stream": True, "temperature": 0, "stream_options": {"include_usage": True}})
    address = urlsplit(url)
    result = Stream(sent=time.monotonic())
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        result.status = response.status
        for raw in response:  # chunked transfer decoded by http.client; one SSE line at a time
            line = raw.rstrip(b"\r\n")
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            choices = data.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                result.chunks.append(time.monotonic())
            if data.get("usage"):
                result.tokens = data["usage"]["completion_tokens"]
    except (OSError, http.client.HTTPException, ValueError):
        result.status = -1
    finally:
        connection.close()
    return result


def concurrent(url: str, jobs: list[tuple[float, str, int]]) -> list[Stream]:
    """Send each (delay after start, prompt, max_tokens) on its own thread; the streams in job order."""
    results: list[Stream | None] = [None] * len(jobs)
    start = time.monotonic()

    def run(index: int, delay: float, prompt: str, max_tokens: int) -> None:
        time.sleep(max(0.0, start + delay - time.monotonic()))
        results[index] = stream(url, prompt, max_tokens)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]


def _health(url: str) -> dict:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def measure(url: str, tokenizer, requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    _prompt = Prompts(tokenizer, rng)
    stream(url, _prompt(16), 8)  # warm-up
    single = stream(url, _prompt(16), 64)
    step = statistics.median(single.gaps)
    if single.tokens != len(single.chunks):
        print(f"warning: {single.tokens} tokens came in {len(single.chunks)} chunks: a time between chunks is not "
              "a time between tokens", file=sys.stderr)
    alone_short = stream(url, _prompt(16), 8)
    figures = {"step_s": step, "single_tok_s": 1 / step, "prefill_short_s": alone_short.ttft,
               "prefill_chunk": _health(url).get("prefill_chunk")}
    started = time.monotonic()
    long = concurrent(url, [(0.0, _prompt(16), 256) for _ in range(8)])
    tokens = sum(len(s.chunks) for s in long)
    figures["eight_tok_s"] = tokens / (max(s.chunks[-1] for s in long if s.chunks) - started)
    figures["eight_step_s"] = statistics.median(g for s in long for g in s.gaps)
    # Newcomers while 7 long answers stream: five short requests, one at a time, sent once the long ones all
    # stream (from 2 s on, 0.5 s apart, before the first long one ends), each at a random point of a step.
    newcomers = 5
    jobs = [(0.0, _prompt(16), 256) for _ in range(7)]
    jobs += [(2.0 + 0.5 * i, _prompt(16), 8) for i in range(newcomers)]
    loaded = concurrent(url, jobs)
    ttfts = [s.ttft for s in loaded[7:]]
    figures["newcomer_ttft_s"] = statistics.median(ttfts)
    figures["newcomer_ttft_max_s"] = max(ttfts)
    figures["loaded_step_s"] = statistics.median(g for s in loaded[:7] for g in s.gaps)
    # Capacity: 8 clients sending the mixed requests back to back (closed loop), completed requests/s while
    # all 8 are busy: up to the moment the last request is taken (the tail, with fewer clients left, would
    # read as a lower capacity; counted to the end, 20 requests moved it by up to half between runs).
    clients = 8
    mixed = [(_prompt(rng.choice(PROMPTS)), rng.choice(ANSWERS)) for _ in range(max(2 * clients, requests))]
    started = time.monotonic()
    results: list[tuple[float, Stream]] = []
    emptied: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not mixed:
                    return
                prompt, answer = mixed.pop()
                if not mixed:
                    emptied.append(time.monotonic())
            outcome = stream(url, prompt, answer)
            with lock:
                results.append((time.monotonic(), outcome))

    workers = [threading.Thread(target=client) for _ in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    busy = [outcome for ended, outcome in results if ended <= emptied[0]]
    window = emptied[0] - started
    capacity = len(busy) / window
    figures["capacity_req_s"] = capacity
    figures["capacity_tok_s"] = sum(len(s.chunks) for s in busy) / window

    def unloaded_step() -> float:
        """A lone row's decode step now: the median gap of a 32-token stream sent alone."""
        return statistics.median(stream(url, _prompt(16), 32).gaps)

    for share in (0.4, 0.8):
        before = unloaded_step()
        rate = share * capacity
        clock, jobs, sizes = 0.0, [], []
        for _ in range(requests):
            clock += rng.expovariate(rate)
            sizes.append(rng.choice(PROMPTS))
            jobs.append((clock, _prompt(sizes[-1]), rng.choice(ANSWERS)))
        started = time.monotonic()
        results = concurrent(url, jobs)
        ended = max((s.chunks[-1] for s in results if s.chunks), default=started)
        answered = [(s, size) for s, size in zip(results, sizes, strict=True) if s.status == 200 and s.chunks]
        ok = [s for s, _ in answered]
        short = [s.ttft for s, size in answered if size == PROMPTS[0]]
        around = (before + unloaded_step()) / 2
        figures[f"poisson_{share}"] = {"step_around_s": around,
            "rate_req_s": rate, "ok": len(ok), "sent": len(results),
            "tok_s": sum(len(s.chunks) for s in ok) / max(ended - started, 1e-9),
            "ttft_p50": _pct([s.ttft for s in ok], 0.5), "ttft_p95": _pct([s.ttft for s in ok], 0.95),
            "short_ttft_p50": _pct(short, 0.5), "short_ttft_p95": _pct(short, 0.95),
            "tbt_p50": _pct(gaps := [g for s in ok for g in s.gaps], 0.5), "tbt_p95": _pct(gaps, 0.95)}
    return figures


def report(name: str, scheduler: str, f: dict, rss_mib: float) -> None:
    print(f"\n== {name}, --scheduler {scheduler} (server RSS at the end {rss_mib:.0f} MiB; load average "
          f"{f['load_before']:.1f} before, {f['load_after']:.1f} after: above ~2.5 on 2 cores, other jobs shared "
          "the machine)", flush=True)
    print(f"unloaded: step {_ms(f['step_s'])} ({f['single_tok_s']:.1f} tok/s), short prefill (TTFT) "
          f"{_ms(f['prefill_short_s'])}; prefill chunk {f['prefill_chunk']} tokens")
    print(f"8 long answers: {f['eight_tok_s']:.1f} answer tok/s = {f['eight_tok_s'] / f['single_tok_s']:.1f}x one "
          f"stream; step {_ms(f['eight_step_s'])}")
    bound = f["prefill_short_s"] + 2 * f["loaded_step_s"]
    print(f"newcomers under 7 long answers: TTFT median {_ms(f['newcomer_ttft_s'])} of 5, largest "
          f"{_ms(f['newcomer_ttft_max_s'])} (prefill alone + 2 loaded steps = {_ms(bound)})")
    print(f"capacity, mixed requests, 8 clients back to back (while all 8 are busy): {f['capacity_req_s']:.2f} req/s "
          f"({f['capacity_tok_s']:.1f} answer tok/s)")
    for share in (0.4, 0.8):
        p = f[f"poisson_{share}"]
        print(f"Poisson {share:.0%} of capacity ({p['rate_req_s']:.2f} req/s): {p['ok']}/{p['sent']} ok, "
              f"{p['tok_s']:.1f} tok/s, TTFT p50 {_ms(p['ttft_p50'])} p95 {_ms(p['ttft_p95'])} (short prompts "
              f"{_ms(p['short_ttft_p50'])} / {_ms(p['short_ttft_p95'])}), TBT p50 {_ms(p['tbt_p50'])} p95 "
              f"{_ms(p['tbt_p95'])} ({p['tbt_p95'] / f['step_s']:.1f}x the unloaded step; "
              f"{p['tbt_p95'] / p['step_around_s']:.1f}x the {_ms(p['step_around_s'])} measured around this phase)",
              flush=True)


def visible_tokens_only(path: Path) -> None:
    """Zero the output rows of the random model's tokens that show no text on their own (byte pieces,
    blanks, control pieces, EOS) or whose text the server's stream holds back for the next token (a tail
    such as " n" that a clean-up rule or ChatGLM's punctuation rule may still rewrite): its greedy answers
    then stream one token per chunk and run to their max_tokens, so a time between chunks is a time
    between tokens. (Random weights pick such pieces far more often than a trained model's text holds them:
    before the second rule 3 of 64 tokens came merged into the next chunk, which put the p95 gap at two
    steps.)"""
    from safetensors.torch import load_file, save_file

    from visualglm.config import read_config
    from visualglm.families import family_spec
    from visualglm.generation.detok import DecodeStream

    tokenizer = load_tokenizer(str(path))
    postprocess = family_spec(read_config(path)).postprocess
    weights = load_file(path / "model.safetensors")
    head = weights["lm_head.weight" if "lm_head.weight" in weights else "transformer.output_layer.weight"]
    glm4 = hasattr(tokenizer, "is_special_id")  # GLM-4's specials decode to their names ("<|user|>")
    lead = tokenizer.encode("hello") if glm4 else tokenizer.encode("hello", add_special_tokens=False)

    def held_back(token: int) -> bool:
        stream = DecodeStream(tokenizer, postprocess=postprocess)
        for piece in lead:
            stream.push(piece)
        stream.push(token)
        return bool(stream.flush())

    for token in range(head.shape[0]):
        if token >= tokenizer.vocab_size or (glm4 and tokenizer.is_special_id(token)):
            head[token] = 0
            continue
        text = tokenizer.decode([token])
        if not text.strip() or "\ufffd" in text or token == tokenizer.eos_token_id or held_back(token):
            head[token] = 0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,mid,wide",
                        help="demo (the shipped model), mid (151M random ChatGLM, hidden 1024 x 12 layers), glm4 "
                             "(154M random GLM-4V decoder, hidden 1024 x 14 layers, 2 key/value groups) and/or "
                             "wide (302M random ChatGLM, hidden 2048 x 6 layers)")
    parser.add_argument("--schedulers", default="continuous,static")
    parser.add_argument("--requests", type=int, default=40, help="Poisson arrivals per rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="the server's --prefill-chunk (default: the server's own, measured at start-up)")
    args = parser.parse_args()
    from visualglm.checkpoint.cpu_kernels import plan_cpu_kernels
    from visualglm.kernels.machine import cpu_facts

    facts = cpu_facts()  # the server loads its model on this machine with the same rule
    print(f"CPU: {facts.name} ({facts.capability}), {facts.threads} threads; kernels: {plan_cpu_kernels().describe()}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="visualglm-serve-load-"))
    models: dict[str, list[str]] = {}
    for name in args.models.split(","):
        if name == "demo":
            models["demo model (2.2M)"] = ["--model", str(resolve_model(None))]
        elif name == "mid":
            from visualglm.checkpoint.tiny import write_tiny_random_checkpoint

            path = write_tiny_random_checkpoint(work / "mid", **MID_SHAPE)
            visible_tokens_only(path)
            models["random ChatGLM 151M, bf16"] = ["--model", str(path), "--dtype", "bfloat16"]
        elif name == "glm4":
            from visualglm.checkpoint.tiny import write_tiny_random_checkpoint

            path = write_tiny_random_checkpoint(work / "glm4", family="glm4v", **GLM4_SHAPE)
            visible_tokens_only(path)
            models["random GLM-4V 154M (GLM-4 decoder, grouped keys), bf16"] = [
                "--model", str(path), "--dtype", "bfloat16"]
        elif name == "wide":
            # A decode step reads each cached token's keys/values, 1/(6 * hidden) of the weights per token:
            # at hidden 1024 eight answers of 300 tokens read 37% of the weights again, at ChatGLM-6B's 4096 9%.
            # This model's width keeps that share nearer the real models' (19%) at the same size class.
            from visualglm.checkpoint.tiny import write_tiny_random_checkpoint

            path = write_tiny_random_checkpoint(work / "wide", hidden_size=2048, num_layers=6,
                                                num_attention_heads=16, inner_hidden_size=8192)
            visible_tokens_only(path)
            models["random ChatGLM 302M (hidden 2048), bf16"] = ["--model", str(path), "--dtype", "bfloat16"]
        else:
            parser.error(f"unknown model {name!r}")
    for name, flags in models.items():
        for scheduler in args.schedulers.split(","):
            chunk = [] if args.prefill_chunk is None else ["--prefill-chunk", str(args.prefill_chunk)]
            server = Server("serve", [*flags, "--scheduler", scheduler, "--max-batch", "8", "--max-queue", "64",
                                      "--max-new-tokens", "256", *chunk, "--log-level", "warning"], work / "serve.log")
            try:
                tokenizer = load_tokenizer(flags[1])
                load_before = os.getloadavg()[0]
                figures = measure(server.url, tokenizer, args.requests, args.seed)
                figures.update(load_before=load_before, load_after=os.getloadavg()[0])
                report(name, scheduler, figures, server.rss_mib())
            finally:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
