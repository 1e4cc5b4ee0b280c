"""What this CPU offers the decode kernels: its name and the instruction sets PyTorch's kernels use.

Kernel choices (``visualglm.kernels.decode``) are made by rule from these facts, and benchmark figures
print ``cpu_summary()`` so that every figure says which machine it comes from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CpuFacts:
    name: str  # "Intel(R) Xeon(R) Processor", "AMD EPYC 9R14", ... ("unknown" when not readable)
    capability: str  # what PyTorch dispatches to: "AVX512", "AVX2", "DEFAULT", ...
    avx512_bf16: bool  # native bf16 dot products (AVX-512 BF16)
    amx: bool  # AMX tiles (BF16/INT8 matrix units)
    vnni: bool  # AVX-512 VNNI or AVX-VNNI int8 dot products
    onednn: bool  # PyTorch built with oneDNN (mkldnn) and able to use it
    threads: int


def _cpuinfo_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _probe(name: str) -> bool:
    check = getattr(getattr(torch, "cpu", None), name, None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


@functools.cache
def cpu_facts() -> CpuFacts:
    """The facts of this machine (read once per process)."""
    return CpuFacts(
        name=_cpuinfo_name(),
        capability=torch.backends.cpu.get_cpu_capability(),
        avx512_bf16=_probe("_is_avx512_bf16_supported"),
        amx=_probe("_is_amx_tile_supported"),
        vnni=_probe("_is_vnni_supported"),
        onednn=torch.backends.mkldnn.is_available(),
        threads=torch.get_num_threads(),
    )


def cpu_summary() -> str:
    """One line naming the CPU and what its kernels can use, e.g. for benchmark output."""
    f = cpu_facts()
    units = [u for u, on in (("AVX-512 BF16", f.avx512_bf16), ("VNNI", f.vnni), ("AMX", f.amx)) if on]
    return (f"{f.name} ({f.capability}{', ' + ', '.join(units) if units else ''}), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")
