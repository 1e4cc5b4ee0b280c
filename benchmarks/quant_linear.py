"""Time one 16384x4096 linear (weight-only quantized vs bf16) on CPU at 1 to 128 rows.

Prints ms per call (median of 7 runs after warm-up) and GB/s of weight bytes streamed. "kernel" is PyTorch's
weight-only kernel, "prefill" dequantizes into a reused buffer and runs the ordinary GEMM (the path
``visualglm.quant.linear`` takes from ``PREFILL_MIN_ROWS`` rows on), "auto" is what the module chooses; the
CPU-kernel forms (oneDNN-reordered bf16, oneDNN INT8 with exact activation planes, the optional AMX INT4
kernel) are timed where this CPU and build have them. One weight is timed over and over: on a CPU whose
last-level cache holds it, GB/s are cache speeds (``--weights N`` rotates N copies to stream from memory).
Run: .venv/bin/python -m benchmarks.quant_linear [--rows 1 8 32 128] [--weights 8]
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


def bench(fns, x) -> float:
    """Median seconds per call over ``fns`` (copies of one layer, called in turn)."""
    with torch.no_grad():
        for fn in fns:
            fn(x)
        times = []
        for _ in range(RUNS):
            t = time.perf_counter()
            for fn in fns:
                fn(x)
            times.append((time.perf_counter() - t) / len(fns))
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
    parser.add_argument("--weights", type=int, default=1, help="copies of the layer, called in turn (default 1)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, prefill GEMM dtype {qlinear._PREFILL_DTYPE}, "
          f"PREFILL_MIN_ROWS {qlinear.PREFILL_MIN_ROWS}")
    from visualglm.kernels.machine import cpu_summary

    print(cpu_summary())
    layers = [_layer(i) for i in range(args.weights)]
    cases = _cases(layers)
    print(f"{'path':50s} {'rows':>4s} {'ms':>9s} {'GB/s':>7s}")
    for rows in args.rows:
        x = torch.randn(rows, IN, dtype=torch.bfloat16)
        for name, fns, nbytes in cases:
            s = bench(fns, x)
            print(f"{name:50s} {rows:4d} {s * 1e3:9.2f} {nbytes / s / 1e9:7.2f}", flush=True)


def _layer(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=False)


def _cases(layers: list[nn.Linear]) -> list[tuple[str, list, int]]:
    from visualglm.kernels import native
    from visualglm.kernels.amx_bf16 import AmxBF16Linear
    from visualglm.kernels.onednn_bf16 import PackedBF16Linear, onednn_bf16_available
    from visualglm.quant.amx_int4 import AmxInt4Linear, AmxInt8Linear
    from visualglm.quant.onednn_int8 import OneDNNInt8Linear, onednn_int8_available

    w_bf16 = [lin.weight.detach().to(torch.bfloat16) for lin in layers]
    q8 = [Int8Linear.from_linear(lin) for lin in layers]
    q4 = [Int4Linear.from_linear(lin, group_size=128) for lin in layers]
    bf16_bytes = OUT * IN * 2
    int8_bytes = q8[0].weight.numel() + q8[0].scale.numel() * 4
    int4_bytes = q4[0].qweight.numel() + q4[0].scales_and_zeros.numel() * 2
    cases = [
        ("bf16 F.linear", [lambda x, w=w: F.linear(x, w) for w in w_bf16], bf16_bytes),
        ("int8 kernel (_weight_int8pack_mm)", [_forced(m, 8, False) for m in q8], int8_bytes),
        ("int8 prefill (dequantize + GEMM)", [_forced(m, 8, True) for m in q8], int8_bytes),
        ("int8 auto", q8, int8_bytes),
        ("int4 g128 kernel (_weight_int4pack_mm_for_cpu)", [_forced(m, 4, False) for m in q4], int4_bytes),
        ("int4 g128 prefill (dequantize + GEMM)", [_forced(m, 4, True) for m in q4], int4_bytes),
        ("int4 auto", q4, int4_bytes),
    ]
    def bf16_modules(kind: type) -> list[nn.Module]:
        modules = []
        for w in w_bf16:
            linear = nn.Linear(IN, OUT, bias=False, dtype=torch.bfloat16)
            linear.weight.data = w
            modules.append(kind(linear))
        return modules

    if onednn_bf16_available():
        cases.append(("bf16 oneDNN reordered (PackedBF16Linear)", bf16_modules(PackedBF16Linear), bf16_bytes))
    if native.available():
        cases.append(("bf16 AMX tiles (AmxBF16Linear)", bf16_modules(AmxBF16Linear), bf16_bytes))
    if onednn_int8_available():
        cases.append(("int8 oneDNN, 3 exact planes (OneDNNInt8Linear)",
                      [OneDNNInt8Linear.from_int8(m, 3) for m in q8], int8_bytes))
    if native.available():
        cases.append(("int8 AMX, 3 exact planes (AmxInt8Linear)", [AmxInt8Linear.from_int8(m) for m in q8],
                      int8_bytes))
        cases.append(("int4 g128 AMX, 3 exact planes (AmxInt4Linear)",
                      [AmxInt4Linear.from_int4(m) for m in q4], int4_bytes))
    return cases


if __name__ == "__main__":
    main()
