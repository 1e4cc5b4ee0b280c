"""Optional compiled kernels: the group-wise INT4, the INT8 and the bf16 linear on AMX tiles (``amx_int4.cpp``).

PyTorch's INT4 CPU kernel (``_weight_int4pack_mm_for_cpu``) streams a decode step's weights well but costs
3.5x as much for 8 rows as for one, and ~30x for a 64-token prefill (on a 2-vCPU Xeon with AMX); its
dequantize-and-GEMM alternative spends ~65 ms unpacking one 16384x4096 weight. The AMX kernel reads each
4-bit weight once per call whatever the number of rows and multiplies exactly: the activations are split
into int8 planes (as ``OneDNNInt8Linear`` does), so every product is an int8 dot product summed in int32, and
three planes give the weight-only result to fp32 rounding. The INT8 kernel does the same for int8 weights:
oneDNN's int8 matmul (``visualglm.quant.onednn_int8``) runs on AMX too, but streams a decode step's weight
~15% slower (2.42 against 2.08 ms for a 16384x4096 weight at 1 row on a 2-vCPU Xeon).

Nothing is compiled when a model loads. The kernels are built once, on request, into a cache folder::

    python -m visualglm.kernels.native build     # needs a C++ compiler and ninja (the `kernels` extra)

after which :func:`load` finds them (keyed by the PyTorch version and this source's hash) and
``visualglm.checkpoint.cpu_kernels`` uses them on CPUs with AMX. Without them, or on other CPUs,
the pure-PyTorch kernels run as before. ``VISUALGLM_KERNELS_DIR`` moves the cache folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("amx_int4.cpp")
NAME = "visualglm_amx_int4"
ENV_DIR = "VISUALGLM_KERNELS_DIR"
# AVX-512 F/BW/VL for the vector code, AMX tiles with INT8 and BF16: Intel Xeon 4th generation (Sapphire Rapids) and
# later. -fopenmp: ATen's parallel_for is a header template that splits work only when compiled with OpenMP
# (it then uses the libgomp PyTorch has loaded).
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mamx-tile", "-mamx-int8", "-mamx-bf16",
          "-mfma", "-mavx2"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "amx_tile", "amx_int8", "amx_bf16"}


def build_dir() -> Path:
    """Where the built kernels live: one folder per PyTorch version and source text."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    root = Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "visualglm" / "kernels")
    return root / f"torch-{torch.__version__.replace('+', '-')}-{digest}"


def cpu_supported() -> bool:
    """True when this CPU runs the kernel (AVX-512 F/BW/VL and AMX-INT8 and AMX-BF16, as Linux reports them)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "").split()
    except OSError:
        return False
    return CPU_FLAGS <= set(flags)


def build(verbose: bool = False) -> Path:
    """Compile the kernels into :func:`build_dir` (about a minute); returns the shared library's path.
    Raises RuntimeError with the reason when it cannot (no compiler, no ninja)."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise RuntimeError("building the kernels needs ninja: pip install ninja (or the package's `kernels` "
                           "extra)") from None
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(directory), verbose=verbose)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"building the kernels failed: {exc}") from None
    load.cache_clear()
    return _library(directory)


def _library(directory: Path) -> Path:
    return directory / f"{NAME}.so"  # the name torch.utils.cpp_extension gives it


@functools.cache
def load() -> ModuleType | None:
    """The built kernel (never compiles), or None when it was not built for this PyTorch and source, this CPU
    cannot run it, or Linux refuses the AMX tile state."""
    if not cpu_supported():
        return None
    path = _library(build_dir())
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    if not module.amx_enable():
        return None
    sys.modules.setdefault(NAME, module)
    return module


def available() -> bool:
    """True when the kernels are built for this PyTorch and this source, and this CPU (and Linux) runs them."""
    return load() is not None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m visualglm.kernels.native",
                                     description="Build or check the optional AMX INT4/INT8 kernels.")
    parser.add_argument("command", choices=("build", "status"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "build":
        if not cpu_supported():
            print("this CPU lacks AMX-INT8/BF16 (or AVX-512):"
                  " the kernels would not run here (PyTorch's kernels are used)",
                  file=sys.stderr)
            return 2
        try:
            path = build(args.verbose)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"built {path}")
        return 0
    module = load()
    print(f"CPU with AMX-INT8/BF16: {cpu_supported()}; built kernel: "
          f"{_library(build_dir()) if module is not None else 'none (python -m visualglm.kernels.native build)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
