"""Speed benchmark: prefill and decode throughput against this machine's memory-bandwidth limit.

Decoding one token reads every weight once (plus the KV cache), so the ceiling is
``memory bandwidth / bytes read per step``; the benchmark measures the bandwidth in the same run and
reports the ratio actually reached. On CUDA (``device="cuda"``) it also reports the peak GPU memory, the
ratio to the GPU's nominal HBM bandwidth (a table of known GPUs) and, with ``image=True``, the time of one
image encode; random weights are then drawn on the GPU and quantized there, one layer at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from visualglm.checkpoint.load import (
    apply_cpu_kernels,
    build_model,
    load,
    parse_dtype,
    quantization_plan_info,
    quantize_bits,
)
from visualglm.checkpoint.tiny import init_random_weights
from visualglm.config import get_config, image_size
from visualglm.families import family_spec
from visualglm.generation.engine import GenerationParams, compile_decode, generate_steps
from visualglm.kernels.machine import cpu_summary
from visualglm.models.interface import is_multimodal
from visualglm.quant.cuda_kernels import use_cuda_kernels
from visualglm.quant.output import TiedInt8Output, quantize_tied_output
from visualglm.quant.swap import plan_quantization, swap_empty


@dataclass
class BenchResult:
    model: str
    dtype: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    threads: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_gib: float
    bandwidth_gb_s: float
    bytes_per_step_gb: float
    decode_limit_tokens_per_s: float
    ratio_to_limit: float
    compiled: bool
    warmup_s: float
    device: str = "cpu"
    peak_gpu_memory_gib: float | None = None
    nominal_bandwidth_gb_s: float | None = None  # the GPU's specified HBM bandwidth, when known
    ratio_to_nominal: float | None = None
    image_encode_ms: float | None = None
    cpu: str = ""  # the CPU and what its kernels use (kernels.machine.cpu_summary)
    kernels: str = ""  # the load-time kernel plan (checkpoint.cpu_kernels), empty on a GPU


# Specified HBM bandwidth (GB/s) by device name fragment, most specific first (vendor data sheets).
NOMINAL_BANDWIDTH_GB_S = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
                          ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
                          ("L40S", 864.0), ("A10G", 600.0), ("L4", 300.0))


def nominal_bandwidth(device_name: str) -> float | None:
    """The specified memory bandwidth of a GPU named ``device_name`` (``torch.cuda.get_device_name``)."""
    for fragment, bandwidth in NOMINAL_BANDWIDTH_GB_S:
        if fragment in device_name:
            return bandwidth
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(megabytes: int = 1024, repeats: int = 10, device: torch.device | str = "cpu") -> float:
    """Peak read bandwidth in GB/s: the fastest of ``repeats`` fp32 sums over a buffer far larger than the
    caches (the best streaming rate this machine reaches is what bounds decoding; single runs vary)."""
    device = torch.device(device)
    buffer = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32, device=device)
    buffer.sum()  # fault the pages in
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        buffer.sum()
        _sync(device)
        times.append(time.perf_counter() - start)
    return buffer.numel() * 4 / min(times) / 1e9


def random_model(config_name: str, dtype: torch.dtype, quant: int | None = None, group_size: int = 128,
                 quant_also: tuple[str, ...] = (), device: torch.device | str = "cpu") -> nn.Module:
    """A model of a named config with random weights (small values) in ``dtype``, optionally quantized.

    With ``quant`` the family's planned linears are swapped for empty quantized modules before anything is
    allocated and then filled one at a time from a random float weight, so the full-precision model never
    exists: peak memory stays near the quantized size plus one layer, as when loading a checkpoint.
    On CUDA the weights are drawn on the GPU (same scales, another random stream) and the quantized linears
    then run PyTorch's CUDA kernels (``visualglm.quant.cuda_kernels``).
    """
    device = torch.device(device)
    config = get_config(config_name)
    model = build_model(config)  # meta: shapes only
    planned: dict[str, nn.Module] = {}
    if quant:
        bits = quantize_bits(quant)
        skip = family_spec(config).quant_skip_patterns(quant_also)
        planned = swap_empty(model, plan_quantization(model, bits, group_size=group_size, skip=skip), bits,
                             bias_dtype=dtype)
        model.quantization = {"bits": bits, **quantization_plan_info(bits, skip, group_size)}
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # to_empty gives every module its own new tensor: share the embedding again
    # Small weights (std ~0.02 at width 4096) keep a 28-layer random network's activations finite.
    if device.type == "cpu":
        init_random_weights(model, weight_scale=1.28, layernorm_std=0.0, bias_std=0.0)
    else:
        _init_on_device(model, weight_scale=1.28)
    generator = torch.Generator(device=device).manual_seed(1)
    for module in planned.values():
        weight = torch.randn(module.out_features, module.in_features, generator=generator, device=device)
        module.quantize_(weight.mul_(1.28 / module.in_features**0.5))
        del weight
        if module.bias is not None:
            module.bias.zero_()
    model.config = config
    if "output" in quant_also:
        quantize_tied_output(model)  # a tied output layer's INT8 copy (an untied one is in the plan)
    if device.type == "cuda":
        use_cuda_kernels(model)
    else:
        apply_cpu_kernels(model)
    return model.eval()


@torch.no_grad()
def _init_on_device(model: nn.Module, weight_scale: float) -> None:
    """``init_random_weights`` with ``layernorm_std=0, bias_std=0`` drawn where the parameters are."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, weight_scale / param.shape[-1] ** 0.5, generator=generator)


def bytes_per_decode_step(model: nn.Module, context: int, batch: int) -> int:
    """Weights read per decode step (every parameter and buffer, e.g. quantized weights, but the input
    embedding rows, which are gathered, and the vision tower, which a text step does not run) plus the KV
    cache read at ``context`` tokens."""
    embedding = model.get_input_embeddings().weight
    tower = family_spec(model).vision_tower
    # A tied output layer reads the embedding matrix, unless it has a (quantized) copy of its own.
    output = getattr(model, "lm_head", None)
    output_reads_embedding = (getattr(model.config, "tie_word_embeddings", False)
                              and not isinstance(output, TiedInt8Output))
    seen, total = set(), 0
    for name, module in model.named_modules():
        if tower is not None and (name == tower or name.startswith(tower + ".")):
            continue
        if hasattr(module, "weight_nbytes"):  # CPU kernels keep weights outside parameters and buffers
            total += module.weight_nbytes()
        for param in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param is not embedding or output_reads_embedding:
                total += param.numel() * param.element_size()
    heads, head_dim = model.kv_cache_layout()  # key/value heads: GLM-4 shares them between query heads
    layers = len(model.attention_modules())
    kv = 2 * layers * batch * context * heads * head_dim * next(model.parameters()).element_size()
    return total + kv


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


@torch.inference_mode()
def time_image_encode(model: nn.Module, repeats: int = 5) -> float | None:
    """Best time of one image encode (batch 1, random pixels) in ms, after a warm-up; None without a tower."""
    if not is_multimodal(model):
        return None
    side = image_size(model.config)
    device = next(model.parameters()).device
    pixels = torch.randn(1, 3, *side, device=device)
    model.encode_images(pixels)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model.encode_images(pixels)
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def run_bench(model_path: str | None, config_name: str | None, dtype: str, batch: int, prompt_tokens: int,
              new_tokens: int, compile: bool = False, quant: int | None = None,
              quant_also: tuple[str, ...] = (), device: str = "cpu", image: bool = False) -> BenchResult:
    if batch < 1 or prompt_tokens < 2 or new_tokens < 2:
        raise ValueError("--batch must be >= 1, --prompt-tokens and --new-tokens >= 2")
    torch_dtype = parse_dtype(dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    bandwidth = None
    if dev.type == "cuda":  # before the model, so that the 1 GiB probe is not in the peak memory figure
        bandwidth = measure_bandwidth(device=dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    if model_path:
        model = load(model_path, dtype=torch_dtype, device=dev, progress=False, quantize=quant,
                     quantize_also=quant_also)
        name = str(model_path)
    else:
        model = random_model(config_name or "chatglm-6b", torch_dtype, quant, quant_also=quant_also, device=dev)
        name = f"{config_name} (random weights)"
    if quant:
        name += f", int{quant} weights"
    config = model.config
    # Prompts of distinct ordinary tokens ending in [gMASK] <sop>, like a real ChatGLM prompt.
    # GLM-4's configs name no [gMASK]/<sop> (its template puts them first; for speed the order is moot).
    special = [config.gmask_token_id, config.bos_token_id] if hasattr(config, "gmask_token_id") else []
    body = [100 + (i % 1000) for i in range(prompt_tokens - len(special))]
    prompts = [body + special for _ in range(batch)]
    params = GenerationParams(max_new_tokens=new_tokens)  # greedy, no stop ids: exactly new_tokens steps
    if bandwidth is None:
        bandwidth = measure_bandwidth(device=dev)
    image_ms = time_image_encode(model) if image else None
    compiled = compile_decode(model) if compile else None
    # Warm-up so one-time costs (allocations, kernel selection, compilation, CUDA graph capture) are not
    # timed; with CUDA graphs the second and third steps are the first replays.
    start = time.perf_counter()
    for _ in generate_steps(model, prompts, params=GenerationParams(max_new_tokens=4), compiled=compiled):
        pass
    _sync(dev)
    warmup_s = time.perf_counter() - start
    _sync(dev)
    start = time.perf_counter()
    stamps = []
    for _ in generate_steps(model, prompts, params=params, compiled=compiled):
        _sync(dev)
        stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    decode_tps = batch * (len(stamps) - 1) / decode_s
    per_step = bytes_per_decode_step(model, prompt_tokens + new_tokens // 2, batch)
    limit = batch * bandwidth * 1e9 / per_step
    gpu = {}
    if dev.type == "cuda":
        nominal = nominal_bandwidth(torch.cuda.get_device_name(dev))
        gpu = dict(peak_gpu_memory_gib=torch.cuda.max_memory_allocated(dev) / 1024**3, nominal_bandwidth_gb_s=nominal,
                   ratio_to_nominal=None if nominal is None else decode_tps / (batch * nominal * 1e9 / per_step))
    return BenchResult(
        model=name, dtype=str(torch_dtype).removeprefix("torch."), batch=batch, prompt_tokens=prompt_tokens,
        new_tokens=len(stamps), threads=torch.get_num_threads(), time_to_first_token_s=ttft,
        prefill_tokens_per_s=batch * prompt_tokens / ttft, decode_tokens_per_s=decode_tps,
        peak_rss_gib=_peak_rss_gib(), bandwidth_gb_s=bandwidth, bytes_per_step_gb=per_step / 1e9,
        decode_limit_tokens_per_s=limit, ratio_to_limit=decode_tps / limit, compiled=compile, warmup_s=warmup_s,
        device=str(dev), image_encode_ms=image_ms, cpu=cpu_summary(),
        kernels=_kernel_plan(model), **gpu)


def _kernel_plan(model: nn.Module) -> str:
    """The CPU kernels the load-time transform chose for ``model`` (empty when it did not run)."""
    plan = getattr(model, "cpu_kernels", None)
    return plan.describe() if plan is not None else ""


def format_result(result: BenchResult, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result))
    r = result
    return "\n".join([
        f"model: {r.model}, {r.dtype}, batch {r.batch}, prompt {r.prompt_tokens} tokens, "
        f"{r.new_tokens} new tokens, {r.threads} threads{', torch.compile' if r.compiled else ''}",
        f"warm-up:             {r.warmup_s:.1f} s (4 tokens{', includes compiling' if r.compiled else ''})",
        f"time to first token: {r.time_to_first_token_s:.2f} s",
        f"prefill:             {r.prefill_tokens_per_s:.1f} tok/s",
        f"decode:              {r.decode_tokens_per_s:.2f} tok/s",
        f"peak RSS:            {r.peak_rss_gib:.2f} GiB",
        f"memory bandwidth:    {r.bandwidth_gb_s:.1f} GB/s (measured now)",
        f"bytes per step:      {r.bytes_per_step_gb:.2f} GB",
        f"decode limit:        {r.decode_limit_tokens_per_s:.2f} tok/s (bandwidth / bytes per step)",
        f"ratio to limit:      {r.ratio_to_limit:.0%}",
        *([f"device:              {r.device}"] if r.device != "cpu" else [f"cpu:                 {r.cpu}"]),
        *([f"kernels:             {r.kernels}"] if r.kernels else []),
        *([f"peak GPU memory:     {r.peak_gpu_memory_gib:.2f} GiB"] if r.peak_gpu_memory_gib is not None else []),
        *([f"nominal bandwidth:   {r.nominal_bandwidth_gb_s:.0f} GB/s, decode at {r.ratio_to_nominal:.0%} of its "
           "limit"] if r.ratio_to_nominal is not None else []),
        *([f"image encode:        {r.image_encode_ms:.1f} ms (batch 1)"] if r.image_encode_ms is not None else []),
    ])
