"""Decode and prefill speed side by side with chatglm.cpp, one precision after another, in one run.

For each precision (16-bit: chatglm.cpp f16 / ours bf16; 8-bit: q8_0 / INT8; 4-bit: q4_0 / INT4 g128) the
peer's bench script and ``visualglm bench`` run one after the other, each in its own process so that only
one full-size model is in memory at a time, with the same prompt length, number of new tokens and
threads. Prints both engines' figures, their ratio, and each engine's share of the memory-bandwidth limit
(bytes a decode step reads / fp32-sum bandwidth measured by our bench in the same run; for the peer the
bytes of its GGML file).

The peer is not a dependency: it is built separately, with random-weight GGML files of the real shapes, by
``../shared/peers/chatglm_cpp/setup.sh`` (``PEER_DIR=DIR``), and this script takes ``DIR`` as its argument.
Hold the machine lock while it runs: ``flock /tmp/visualglm-cpu.lock .venv/bin/python -m
benchmarks.peer_decode /work/peer``. ``--ours-only`` runs our side alone when no peer is built.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEER_SCRIPTS = REPO.parent / "shared" / "peers" / "chatglm_cpp"
# precision label -> (peer GGML file type, our bench flags)
PRECISIONS = {"16": ("f16", []), "8": ("q8_0", ["--quantize", "8"]), "4": ("q4_0", ["--quantize", "4"])}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer_dir", nargs="?", help="folder setup.sh built (venv/ and chatglm6b-*.bin)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["16", "8", "4"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="our batch (the peer decodes one sequence)")
    parser.add_argument("--config", default="chatglm-6b")
    parser.add_argument("--peer-scripts", type=Path, default=DEFAULT_PEER_SCRIPTS,
                        help="folder holding the peer's bench_cpp.py (default: %(default)s)")
    parser.add_argument("--ours-only", action="store_true", help="run our side only (no peer needed)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further flags for visualglm bench, e.g. --extra --compile")
    parser.add_argument("--quantize-output", action="store_true",
                        help="at 8 and 4 bit, our output layer gets an INT8 copy too (visualglm bench "
                             "--quantize-output; the peer's GGML files quantize it)")
    parser.add_argument("--json", action="store_true", help="also print every raw result as JSON lines")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 3 or args.new_tokens < 2 or args.threads < 1 or args.batch < 1:
        parser.error("--prompt-tokens >= 3, --new-tokens >= 2, --threads >= 1 and --batch >= 1")
    return args


def peer_problem(args: argparse.Namespace) -> str | None:
    """Why the peer cannot run (None when it can)."""
    if args.ours_only:
        return None
    if not args.peer_dir:
        return "no peer folder given (pass the folder setup.sh built, or --ours-only)"
    peer = Path(args.peer_dir)
    python = peer / "venv" / "bin" / "python"
    missing = [] if python.is_file() else [str(python)]
    missing += [str(peer / f"chatglm6b-{PRECISIONS[p][0]}.bin") for p in args.precisions
                if not (peer / f"chatglm6b-{PRECISIONS[p][0]}.bin").is_file()]
    if not (args.peer_scripts / "bench_cpp.py").is_file():
        missing.append(str(args.peer_scripts / "bench_cpp.py"))
    if missing:
        return ("the chatglm.cpp peer is missing here: " + ", ".join(missing) + ". Build it with "
                f"PEER_DIR={peer} {args.peer_scripts / 'setup.sh'} (or run with --ours-only)")
    return None


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in the output:\n{text[-2000:]}")


def run_peer(args: argparse.Namespace, precision: str) -> dict:
    peer = Path(args.peer_dir)
    path = peer / f"chatglm6b-{PRECISIONS[precision][0]}.bin"
    with open(path, "rb") as f:  # the peer memory-maps its file: read it into the page cache first
        while f.read(1 << 24):
            pass
    cmd = [str(peer / "venv" / "bin" / "python"), str(args.peer_scripts / "bench_cpp.py"), str(path),
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--prompt-len",
           str(args.prompt_tokens), "--repeats", "1", "--warmup", "1"]
    env = dict(os.environ, PEER_DIR=str(peer))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chatglm.cpp bench failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result = _last_json(done.stdout)
    result["file_bytes"] = path.stat().st_size
    return result


def run_ours(args: argparse.Namespace, precision: str) -> dict:
    cmd = [sys.executable, "-m", "visualglm", "bench", "--config", args.config, "--random", "--prompt-tokens",
           str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
           *PRECISIONS[precision][1], *(["--quantize-output"] if args.quantize_output and precision != "16" else []),
           *args.extra, "--json"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"visualglm bench failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return _last_json(done.stdout)


def cpu_line() -> str:
    from visualglm.kernels.machine import cpu_summary

    return cpu_summary()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    problem = peer_problem(args)
    if problem:
        print(f"peer_decode: {problem}", file=sys.stderr)
        return 2
    print(f"CPU: {cpu_line()}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, batch {args.batch} (ours), {args.config} random weights", flush=True)
    rows = []
    for precision in args.precisions:
        peer = None if args.ours_only else run_peer(args, precision)
        ours = run_ours(args, precision)
        if args.json:
            print(json.dumps({"precision": precision, "peer": peer, "ours": ours}), flush=True)
        rows.append((precision, peer, ours))
        print(_row(precision, peer, ours), flush=True)
    print()
    print("| precision | chatglm.cpp decode | ours decode | ours / peer | ours vs limit | peer vs limit "
          "| prefill: peer / ours | bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for precision, peer, ours in rows:
        print(_row(precision, peer, ours))
    return 0


def _row(precision: str, peer: dict | None, ours: dict) -> str:
    label = {"16": "16-bit (f16 / bf16)", "8": "8-bit (q8_0 / INT8)", "4": "4-bit (q4_0 / INT4 g128)"}[precision]
    bw = ours["bandwidth_gb_s"]
    ours_txt = f"{ours['decode_tokens_per_s']:.2f} tok/s"
    if peer is None:
        return (f"| {label} | - | {ours_txt} | - | {ours['ratio_to_limit']:.2f} | - | "
                f"- / {ours['prefill_tokens_per_s']:.1f} tok/s | {bw:.1f} GB/s |")
    peer_tps = peer["decode_tok_s_median"]
    peer_limit = bw * 1e9 / peer["file_bytes"]  # the peer reads (about) its whole file per step
    return (f"| {label} | {peer_tps:.2f} tok/s | {ours_txt} | {ours['decode_tokens_per_s'] / peer_tps:.2f}x | "
            f"{ours['ratio_to_limit']:.2f} | {peer_tps / peer_limit:.2f} | {peer['prefill_tok_s_median']:.1f} / "
            f"{ours['prefill_tokens_per_s']:.1f} tok/s | {bw:.1f} GB/s |")


if __name__ == "__main__":
    sys.exit(main())
