"""Time one 16384x4096 linear (weight-only quantized vs bf16) on CPU at 1 and 8 rows.

Prints ms per call (median of 7 runs after warm-up) and GB/s of weight bytes streamed.
Run: .venv/bin/python benchmarks/quant_linear.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant import Int4Linear, Int8Linear

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


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}")
    lin = nn.Linear(IN, OUT, bias=False)
    w_bf16 = lin.weight.detach().to(torch.bfloat16)
    q8 = Int8Linear.from_linear(lin)
    q8d = Int8Linear.from_linear(lin)
    q8d.backend = "dequant"
    q4 = Int4Linear.from_linear(lin, group_size=128)
    q4d = Int4Linear.from_linear(lin, group_size=128)
    q4d.backend = "dequant"
    int4_bytes = q4.qweight.numel() + q4.scales_and_zeros.numel() * 2
    cases = [
        ("bf16 F.linear", lambda x: F.linear(x, w_bf16), w_bf16.numel() * 2),
        ("int8 kernel (_weight_int8pack_mm)", q8, q8.weight.numel() + q8.scale.numel() * 4),
        ("int8 dequant + F.linear", q8d, q8.weight.numel() + q8.scale.numel() * 4),
        ("int4 g128 kernel (_weight_int4pack_mm_for_cpu)", q4, int4_bytes),
        ("int4 g128 dequant + F.linear", q4d, int4_bytes),
    ]
    print(f"{'path':50s} {'rows':>4s} {'ms':>9s} {'GB/s':>7s}")
    for rows in (1, 8):
        x = torch.randn(rows, IN, dtype=torch.bfloat16)
        for name, fn, nbytes in cases:
            s = bench(fn, x)
            print(f"{name:50s} {rows:4d} {s * 1e3:9.2f} {nbytes / s / 1e9:7.2f}")


if __name__ == "__main__":
    main()
