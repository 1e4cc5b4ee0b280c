"""Time one 16384x4096 linear (weight-only quantized vs bf16) on CPU at 1 to 128 rows.

Prints ms per call (median of 7 runs after warm-up) and GB/s of weight bytes streamed. "kernel" is PyTorch's
weight-only kernel, "prefill" dequantizes into a reused buffer and runs the ordinary GEMM (the path
``visualglm.quant.linear`` takes from ``PREFILL_MIN_ROWS`` rows on), "auto" is what the module chooses.
Run: .venv/bin/python -m benchmarks.quant_linear [--rows 1 8 32 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant import Int4Linear, Int8Linear
from visualglm.quant import linear as qlinear

OUT, IN = 16384, 4096
RUNS = 7


def bench(fn, x) -> float:
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(RUNS):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _forced(module: nn.Module, bits: int, prefill: bool):
    """Call ``module`` with the prefill path forced on (threshold 1) or off."""
    def call(x: torch.Tensor) -> torch.Tensor:
        saved = qlinear.PREFILL_MIN_ROWS[bits]
        qlinear.PREFILL_MIN_ROWS[bits] = 1 if prefill else None
        try:
            return module(x)
        finally:
            qlinear.PREFILL_MIN_ROWS[bits] = saved
    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, prefill GEMM dtype {qlinear._PREFILL_DTYPE}, "
          f"PREFILL_MIN_ROWS {qlinear.PREFILL_MIN_ROWS}")
    lin = nn.Linear(IN, OUT, bias=False)
    w_bf16 = lin.weight.detach().to(torch.bfloat16)
    q8 = Int8Linear.from_linear(lin)
    q4 = Int4Linear.from_linear(lin, group_size=128)
    int8_bytes = q8.weight.numel() + q8.scale.numel() * 4
    int4_bytes = q4.qweight.numel() + q4.scales_and_zeros.numel() * 2
    cases = [
        ("bf16 F.linear", lambda x: F.linear(x, w_bf16), w_bf16.numel() * 2),
        ("int8 kernel (_weight_int8pack_mm)", _forced(q8, 8, False), int8_bytes),
        ("int8 prefill (dequantize + GEMM)", _forced(q8, 8, True), int8_bytes),
        ("int8 auto", q8, int8_bytes),
        ("int4 g128 kernel (_weight_int4pack_mm_for_cpu)", _forced(q4, 4, False), int4_bytes),
        ("int4 g128 prefill (dequantize + GEMM)", _forced(q4, 4, True), int4_bytes),
        ("int4 auto", q4, int4_bytes),
    ]
    print(f"{'path':50s} {'rows':>4s} {'ms':>9s} {'GB/s':>7s}")
    for rows in args.rows:
        x = torch.randn(rows, IN, dtype=torch.bfloat16)
        for name, fn, nbytes in cases:
            s = bench(fn, x)
            print(f"{name:50s} {rows:4d} {s * 1e3:9.2f} {nbytes / s / 1e9:7.2f}", flush=True)


if __name__ == "__main__":
    main()
