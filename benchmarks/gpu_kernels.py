"""One weight-only linear on a GPU: time per call and bytes streamed per second, for each path.

For a ChatGLM-6B-sized weight (default 16384 x 4096) at a few row counts: bf16 ``F.linear``; INT8 through
``torch._weight_int8pack_mm`` ("aten") and the fusable dequantize-matmul in eager and under torch.compile
("fused"); INT4 through tinygemm and through dequantize + ``F.linear``. What it prints decides the INT8
default (``visualglm.quant.cuda_kernels``) and whether prefill should leave the kernels from some row count.

    .venv/bin/python -m benchmarks.gpu_kernels [--out 16384 --in 4096 --rows 1,8,32,128,512] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant import cuda_kernels as ck
from visualglm.quant.linear import Int4Linear, Int8Linear


def _time(fn, x, repeats: int = 50) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=16384)
    parser.add_argument("--in", dest="in_features", type=int, default=4096)
    parser.add_argument("--rows", default="1,8,32,128,512")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out, bias=False, device="cuda", dtype=torch.bfloat16)
    int8 = ck.CudaInt8Linear.from_int8(Int8Linear.from_linear(linear))
    int4 = ck.CudaInt4Linear.from_int4(Int4Linear.from_linear(linear, 128))
    w16 = linear.weight
    paths = {
        "bf16 F.linear": (lambda x: F.linear(x, w16), w16.numel() * 2),
        "int8 aten": (lambda x: torch._weight_int8pack_mm(x, int8.weight, int8.scale.to(x.dtype)),
                      int8.weight.numel()),
        "int8 fused eager": (lambda x: (F.linear(x, int8.weight.to(x.dtype)) * int8.scale).to(x.dtype),
                             int8.weight.numel()),
        "int4 dequant+linear": (lambda x: F.linear(x, int4.dequantize(x.dtype)), int4.qweight.numel()),
    }
    if int4.use_kernel:
        paths["int4 tinygemm"] = (lambda x: int4(x), int4.qweight.numel())
    os.environ[ck.INT8_ENV] = "fused"
    torch._inductor.config.coordinate_descent_tuning = True  # gpt-fast's setting: GEMV as a tuned reduction
    fused = torch.compile(int8, dynamic=False)
    paths["int8 fused compiled"] = (lambda x: fused(x), int8.weight.numel())
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, args.in_features, device="cuda", dtype=torch.bfloat16)
        for name, (fn, nbytes) in paths.items():
            try:
                seconds = _time(fn, x)
            except Exception as exc:  # one failing path must not hide the others
                results.append({"rows": rows, "path": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            results.append({"rows": rows, "path": name, "ms": seconds * 1000, "weight_gb_s": nbytes / seconds / 1e9})
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "shape": [args.out, args.in_features],
                          "results": results}))
        return
    print(f"{torch.cuda.get_device_name()}, weight {args.out} x {args.in_features}")
    for r in results:
        if "error" in r:
            print(f"rows {r['rows']:4d}  {r['path']:22s}  FAILED {r['error']}")
        else:
            print(f"rows {r['rows']:4d}  {r['path']:22s}  {r['ms']:8.3f} ms  {r['weight_gb_s']:8.1f} GB/s of weight")


if __name__ == "__main__":
    main()
