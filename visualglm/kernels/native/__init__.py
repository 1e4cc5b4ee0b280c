"""Optional compiled kernels, built on request: the AMX linears (``amx_int4.cpp``) and the decode-step
attention over a strided cache (``strided_attention.cpp``).

``amx_int4.cpp``: the group-wise INT4, the INT8 and the bf16 linear on AMX tiles. PyTorch's INT4 CPU kernel
(``_weight_int4pack_mm_for_cpu``) streams a decode step's weights well but costs 3.5x as much for 8 rows as
for one, and ~30x for a 64-token prefill (on a 2-vCPU Xeon with AMX); its dequantize-and-GEMM alternative
spends ~65 ms unpacking one 16384x4096 weight. The AMX kernel reads each 4-bit weight once per call whatever
the number of rows and multiplies exactly: the activations are split into int8 planes (as ``OneDNNInt8Linear``
does), so every product is an int8 dot product summed in int32, and three planes give the weight-only result
to fp32 rounding. The INT8 kernel does the same for int8 weights: oneDNN's int8 matmul
(``visualglm.quant.onednn_int8``) runs on AMX too, but streams a decode step's weight ~15% slower (2.42
against 2.08 ms for a 16384x4096 weight at 1 row on a 2-vCPU Xeon).

``strided_attention.cpp`` (built with AVX-512F, or with AVX2 and FMA where the CPU lacks AVX-512): one query
row per head against the cached keys/values of a continuous batch, read in place
(``visualglm.kernels.strided_attention``).

Nothing is compiled when a model loads. The kernels are built once, on request, into a cache folder::

    python -m visualglm.kernels.native build     # needs a C++ compiler and ninja (the `kernels` extra)

which builds those this CPU runs; :func:`load` (AMX) and :func:`load_attention` then find them (keyed by the
PyTorch version and the source's hash) and ``visualglm.checkpoint.cpu_kernels`` uses them. Without them, or
on other CPUs, the pure-PyTorch kernels run as before. ``VISUALGLM_KERNELS_DIR`` moves the cache folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

ENV_DIR = "VISUALGLM_KERNELS_DIR"


@dataclass(frozen=True)
class Extension:
    """One optional C++ extension: its source, compiler flags and the CPU flags (as Linux names them) it needs."""

    name: str
    source: Path
    cflags: tuple[str, ...]
    cpu_flags: frozenset[str]
    description: str
    instead_of: Extension | None = None  # built only on CPUs that cannot run this one (a narrower build)

    def build_dir(self) -> Path:
        """Where the built kernel lives: one folder per PyTorch version and source text."""
        digest = hashlib.sha256(self.source.read_bytes() + " ".join(self.cflags).encode()).hexdigest()[:12]
        root = Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "visualglm" / "kernels")
        return root / f"torch-{torch.__version__.replace('+', '-')}-{digest}"

    def library(self) -> Path:
        return self.build_dir() / f"{self.name}.so"  # the name torch.utils.cpp_extension gives it

    def missing_flags(self) -> set[str]:
        """The flags the kernel is compiled for that this CPU lacks (as /proc/cpuinfo names them; all of them
        when it cannot be read)."""
        try:
            flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), "").split()
        except OSError:
            return set(self.cpu_flags)
        return set(self.cpu_flags) - set(flags)

    def cpu_supported(self) -> bool:
        """True when this CPU has every flag the kernel is compiled for."""
        return not self.missing_flags()

    def build(self, verbose: bool = False) -> Path:
        """Compile into :meth:`build_dir` (under a minute); returns the shared library's path. Raises
        RuntimeError with the reason when it cannot (no compiler, no ninja)."""
        from torch.utils import cpp_extension

        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError:
            raise RuntimeError("building the kernels needs ninja: pip install ninja (or the package's `kernels` "
                               "extra)") from None
        directory = self.build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            cpp_extension.load(self.name, [str(self.source)], extra_cflags=list(self.cflags),
                               extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=verbose)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(f"building the kernels failed: {exc}") from None
        return self.library()

    def import_built(self) -> ModuleType | None:
        """The built module (never compiles), or None when it is not built for this PyTorch and source, or
        this CPU cannot run it."""
        if not self.cpu_supported():
            return None
        path = self.library()
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location(self.name, path)
        if spec is None or spec.loader is None:
            return None
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError:
            return None
        sys.modules.setdefault(self.name, module)
        return module


_HERE = Path(__file__).parent
# -fopenmp: ATen's parallel_for is a header template that splits work only when compiled with OpenMP (it then
# uses the libgomp PyTorch has loaded).
# AVX-512 F/BW/VL for the vector code, AMX tiles with INT8 and BF16: Intel Xeon 4th generation (Sapphire Rapids)
# and later.
AMX = Extension("visualglm_amx_int4", _HERE / "amx_int4.cpp",
                ("-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mamx-tile", "-mamx-int8",
                 "-mamx-bf16", "-mfma", "-mavx2"),
                frozenset({"avx512f", "avx512bw", "avx512vl", "amx_tile", "amx_int8", "amx_bf16"}),
                "AMX INT4/INT8/bf16 linears")
# AVX-512F only (Intel Skylake-SP and later, AMD Zen 4 and later).
ATTENTION = Extension("visualglm_strided_attention", _HERE / "strided_attention.cpp",
                      ("-O3", "-fopenmp", "-mavx512f", "-mfma"), frozenset({"avx512f"}),
                      "decode-step attention over a strided bf16 cache")
# The same source for CPUs without AVX-512 (Intel Haswell to Comet Lake, AMD Zen 1-3): 8 floats a vector.
ATTENTION_AVX2 = Extension("visualglm_strided_attention_avx2", _HERE / "strided_attention.cpp",
                           ("-O3", "-fopenmp", "-mavx2", "-mfma"), frozenset({"avx2", "fma"}),
                           "decode-step attention over a strided bf16 cache (AVX2)", instead_of=ATTENTION)
EXTENSIONS = (AMX, ATTENTION, ATTENTION_AVX2)

def cpu_supported() -> bool:
    """True when this CPU runs the AMX kernels (AVX-512 F/BW/VL, AMX-INT8 and AMX-BF16)."""
    return AMX.cpu_supported()


def build(verbose: bool = False) -> Path:
    """Compile the AMX kernels; returns the shared library's path (RuntimeError with the reason if it cannot)."""
    path = AMX.build(verbose)
    load.cache_clear()
    return path


@functools.cache
def load() -> ModuleType | None:
    """The built AMX kernels (never compiles), or None when they were not built for this PyTorch and source,
    this CPU cannot run them, or Linux refuses the AMX tile state."""
    module = AMX.import_built()
    if module is None or not module.amx_enable():
        return None
    return module


def available() -> bool:
    """True when the AMX kernels are built for this PyTorch and source, and this CPU (and Linux) runs them."""
    return load() is not None


@functools.cache
def load_attention() -> ModuleType | None:
    """The built strided-cache attention kernel (never compiles): the AVX-512 build where this CPU runs it,
    else the AVX2 one; None when neither is built for this CPU."""
    if ATTENTION.cpu_supported():
        return ATTENTION.import_built()
    return ATTENTION_AVX2.import_built()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m visualglm.kernels.native",
                                     description="Build or check the optional compiled kernels.")
    parser.add_argument("command", choices=("build", "status"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "build":
        runnable = [extension for extension in EXTENSIONS if extension.cpu_supported()
                    and not (extension.instead_of and extension.instead_of.cpu_supported())]
        for extension in EXTENSIONS:
            if extension not in runnable and not extension.instead_of:
                print(f"{extension.description}: this CPU lacks {', '.join(sorted(extension.missing_flags()))}"
                      " (PyTorch's kernels are used)", file=sys.stderr)
        if not runnable:
            return 2
        for extension in runnable:
            try:
                path = extension.build(args.verbose)
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            print(f"built {extension.description}: {path}")
        load.cache_clear()
        load_attention.cache_clear()
        return 0
    for extension in EXTENSIONS:
        if extension.instead_of and extension.instead_of.cpu_supported():
            continue  # (the wider build serves this CPU)
        built = extension.library() if extension.library().is_file() else \
            "none (python -m visualglm.kernels.native build)"
        print(f"{extension.description}: CPU runs it: {extension.cpu_supported()}; built: {built}")
    return 0
