"""Peak memory of loading a full-size checkpoint, compared with the bytes of the loaded weights.

Writes a random ChatGLM-6B checkpoint in the official HF layout (safetensors shards + index + config.json)
to a temporary directory, then loads it with ``visualglm.load`` in a fresh process and prints:
- the loaded weights' bytes,
- peak RSS right after loading (memory-mapped weights are not all touched yet),
- peak RSS after one forward pass over a short prompt and a read of every weight (every weight page
  touched): the honest figure,
- the ratio of that peak to the weights' bytes (target <= 1.2).

With ``--quantize 4|8`` the language model is quantized while loading (the vision tower and the embeddings
stay 16-bit); the weights' bytes are then those of the quantized model. ``--dir DIR`` with a checkpoint
already there reuses it (write it once with ``--keep``, e.g. for ``--config visualglm-6b``, ~16 GB).

Usage: python -m benchmarks.load_memory [--config chatglm-6b] [--store-dtype bfloat16] [--dtype bfloat16]
                                         [--quantize 4|8 [--quant-vision]] [--shard-gb 2] [--dir DIR] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3


def write_random_checkpoint(directory: Path, config_name: str, store_dtype: str, shard_bytes: int) -> int:
    """Write config.json + ``model-XXXXX-of-YYYYY.safetensors`` shards + index; return the bytes written."""
    import torch
    from safetensors.torch import save_file

    from visualglm.checkpoint.keymaps import invert, map_key
    from visualglm.checkpoint.load import build_model, parse_dtype
    from visualglm.config import get_config, write_config
    from visualglm.families import family_spec

    config = get_config(config_name)
    config.torch_dtype = str(parse_dtype(store_dtype)).removeprefix("torch.")
    dtype = parse_dtype(store_dtype)
    to_source = invert(family_spec(config).keymap("hf"))
    model = build_model(config)  # meta: only shapes
    shapes = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shapes[map_key(name, to_source)] = tuple(param.shape)
    # Group keys into shards of about shard_bytes.
    shards: list[list[str]] = [[]]
    size = 0
    element = torch.tensor([], dtype=dtype).element_size()
    for key, shape in shapes.items():
        nbytes = element * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    # Values are drawn from one pool of 16M normal samples at random offsets: drawing ~8 billion normals
    # one by one takes many minutes on a small CPU, and only the sizes matter here.
    pool = (torch.randn(1 << 24, generator=generator) * 0.02).to(dtype)

    def fill(shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        start = int(torch.randint(0, pool.numel(), (1,), generator=generator))
        return pool.roll(-start).repeat(n // pool.numel() + 1)[:n].reshape(shape).clone()

    for i, keys in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        nbytes = sum(element * math.prod(shapes[k]) for k in keys)
        if not _complete_shard(directory / file_name, keys):  # resume an interrupted write
            tensors = {k: fill(shapes[k]) for k in keys}
            save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
            del tensors
        total += nbytes
        weight_map.update({k: file_name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_config(config, directory)
    return total


def _complete_shard(path: Path, keys: list[str]) -> bool:
    """A shard file written before that holds exactly ``keys``."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return sorted(handle.keys()) == sorted(keys)
    except Exception:  # truncated or not a safetensors file: write it again
        return False


def _vm(field: str) -> int:
    """A /proc/self/status figure in bytes (VmHWM = peak RSS of this process image; unlike ru_maxrss it
    does not inherit the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss() -> dict[str, int]:
    """Current RSS split into anonymous memory (the heap: quantized buffers, tensors copied or created,
    allocator slack) and file-backed pages (memory-mapped checkpoint pages that were touched, libraries)."""
    return {"anon": _vm("RssAnon"), "file": _vm("RssFile") + _vm("RssShmem")}


def _checkpoint_mappings() -> tuple[int, int]:
    """(number of memory mappings of .safetensors files, their resident bytes), from /proc/self/smaps."""
    count = resident = 0
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
            current = len(head) == 6 and head[5].endswith(".safetensors")
            count += current
        elif current and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    return count, resident


class _PeakSampler:
    """Samples anonymous and file-backed RSS every few milliseconds in a thread and keeps each one's peak
    per phase (VmHWM only knows the total)."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.phase, self.interval = "imports", interval
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        now = _rss()
        peak = self.peaks.setdefault(self.phase, {"anon": 0, "file": 0, "total": 0})
        peak["anon"], peak["file"] = max(peak["anon"], now["anon"]), max(peak["file"], now["file"])
        peak["total"] = max(peak["total"], now["anon"] + now["file"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()


def _weight_groups(model) -> dict[str, int]:
    """Bytes of the loaded weights by kind: quantized buffers, word embeddings, vision tower, the rest."""
    from visualglm.quant import Int4Linear, Int8Linear

    groups = {"quantized": 0, "embeddings": 0, "vision": 0, "other": 0}
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            groups["quantized"] += sum(b.numel() * b.element_size() for b in module.buffers())
    for name, param in model.named_parameters():  # tied parameters once
        if name.startswith(("image_encoder.", "transformer.vision.")):
            kind = "vision"
        elif "word_embeddings" in name or name.startswith("transformer.embedding."):
            kind = "embeddings"
        else:
            kind = "other"
        groups[kind] += param.numel() * param.element_size()
    return groups


def measure_load(directory: Path, dtype: str, quantize: int | None = None, also: tuple[str, ...] = ()) -> dict:
    """Runs in a fresh process: load, forward twice, read every weight; report RSS figures (bytes)."""
    import ctypes

    import torch

    import visualglm
    from visualglm.quant import Int4Linear, Int8Linear

    sampler = _PeakSampler()
    baseline = _vm("VmHWM")
    rss = {"imports": _rss()}
    sampler.enter("load")
    start = time.perf_counter()
    model = visualglm.load(directory, dtype=dtype, progress=False, quantize=quantize, quantize_also=also)
    load_s = time.perf_counter() - start
    sampler.enter("after load")
    peak_after_load = _vm("VmHWM")
    rss["load"] = _rss()
    # What the C allocator still keeps of memory freed during loading (the loader trims it already).
    ctypes.CDLL(None).malloc_trim(0)
    rss["load_trimmed"] = _rss()
    quantized = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    tensors = list({id(t): t for t in [*model.parameters(), *(b for m in quantized for b in m.buffers())]}.values())
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    groups = _weight_groups(model)
    config = model.config
    prompt = torch.tensor([[5, 6, 7, config.gmask_token_id, config.bos_token_id]])
    forward_s = []
    with torch.inference_mode():
        for phase in ("forward 1", "forward 2"):
            sampler.enter(phase)
            start = time.perf_counter()
            model(prompt, logits_to_keep=1)
            forward_s.append(time.perf_counter() - start)
            rss[phase] = _rss()
        # A text prompt does not read the vision tower: read every weight so its pages count too. amax
        # reads without a temporary (sum() would widen a uint8 INT4 buffer to int64 first).
        sampler.enter("read weights")
        start = time.perf_counter()
        for tensor in tensors:
            tensor.amax()
        read_s = time.perf_counter() - start
    rss["read weights"] = _rss()
    sampler.stop()
    peak_after_forward = _vm("VmHWM")
    maps, mapped_rss = _checkpoint_mappings()
    return {"weight_bytes": weight_bytes, "weight_groups": groups, "baseline_rss": baseline,
            "peak_rss_after_load": peak_after_load, "peak_rss_after_forward": peak_after_forward,
            "rss": rss, "phase_peaks": sampler.peaks, "checkpoint_mappings": maps,
            "checkpoint_mapped_rss": mapped_rss, "load_seconds": load_s, "forward_seconds": forward_s,
            "read_seconds": read_s, "ratio": peak_after_forward / weight_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="chatglm-6b", help="named config to write (default: chatglm-6b)")
    parser.add_argument("--store-dtype", default="bfloat16", help="dtype of the written checkpoint")
    parser.add_argument("--dtype", default="bfloat16", help="dtype to load into")
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                        help="quantize the language model to INT4/INT8 while loading")
    parser.add_argument("--quant-vision", action="store_true",
                        help="with --quantize: quantize the vision tower too")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GiB (default 2)")
    parser.add_argument("--dir", type=Path, help="write the checkpoint here (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_load(args.measure, args.dtype, args.quantize,
                                      ("vision",) if args.quant_vision else ())))
        return 0

    directory = args.dir or Path(tempfile.mkdtemp(prefix="visualglm-loadmem-"))
    try:
        start = time.perf_counter()
        if (directory / "config.json").is_file():  # reuse a checkpoint written before (--keep)
            written = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        else:  # (shards already complete in --dir are kept)
            written = write_random_checkpoint(directory, args.config, args.store_dtype, int(args.shard_gb * GIB))
        write_s = time.perf_counter() - start
        quant = (["--quantize", str(args.quantize)] if args.quantize else []) + (
            ["--quant-vision"] if args.quant_vision else [])
        child = subprocess.run([sys.executable, "-m", "benchmarks.load_memory", "--measure", str(directory),
                                "--dtype", args.dtype, *quant], capture_output=True, text=True, check=False,
                               cwd=Path(__file__).resolve().parent.parent, env={**os.environ})
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result.update({"config": args.config, "store_dtype": args.store_dtype, "dtype": args.dtype,
                       "quantize": args.quantize, "quant_vision": args.quant_vision,
                       "checkpoint_bytes": written, "write_seconds": write_s})
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        split = lambda r: f"anon {gib(r['anon'])} + file {gib(r['file'])}"  # noqa: E731
        quant = f", language model quantized to INT{args.quantize} while loading" if args.quantize else ""
        quant += " (vision tower too)" if args.quant_vision else ""
        groups = result["weight_groups"]
        rss, peaks = result["rss"], result["phase_peaks"]
        print(f"checkpoint: {args.config}, stored {args.store_dtype} ({gib(written)}), loaded as {args.dtype}{quant}")
        print(f"loaded weights:           {gib(result['weight_bytes'])}  (quantized {gib(groups['quantized'])}, "
              f"word embeddings {gib(groups['embeddings'])}, vision {gib(groups['vision'])}, "
              f"other {gib(groups['other'])})")
        print(f"peak RSS after imports:   {gib(result['baseline_rss'])}")
        print(f"peak RSS after load:      {gib(result['peak_rss_after_load'])}  ({result['load_seconds']:.1f} s)")
        print(f"peak RSS after a forward: {gib(result['peak_rss_after_forward'])}  "
              f"(2 forwards {sum(result['forward_seconds']):.1f} s, reading every weight "
              f"{result['read_seconds']:.1f} s)")
        print(f"peak RSS / weights:       {result['ratio']:.3f}  (target <= 1.2)")
        print("RSS at the end of each phase (anon: heap; file: touched pages of mapped files):")
        print(f"  imports       {split(rss['imports'])}")
        print(f"  load          {split(rss['load'])}  (after malloc_trim: anon {gib(rss['load_trimmed']['anon'])})")
        for phase in ("forward 1", "forward 2", "read weights"):
            print(f"  {phase:13} {split(rss[phase])}")
        print("peak during each phase (sampled every 5 ms; anon and file peaks may fall at different moments):")
        for phase, peak in peaks.items():
            print(f"  {phase:13} anon {gib(peak['anon'])}, file {gib(peak['file'])}, total {gib(peak['total'])}")
        print(f"checkpoint mappings at the end: {result['checkpoint_mappings']}, "
              f"resident {gib(result['checkpoint_mapped_rss'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
