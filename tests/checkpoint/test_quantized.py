"""Quantize while loading, quantized checkpoints written by us, and THUDM's pre-quantized layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import visualglm
from visualglm.checkpoint.load import CheckpointError, apply_quantization
from visualglm.checkpoint.save import save_checkpoint, source_state_dict
from visualglm.quant import linear as qlinear
from visualglm.quant.linear import Int4Linear, Int8Linear, quantized_bits

from ..conftest import random_chatglm

PROMPT = torch.tensor([[20, 21, 22, 1001, 1004]])
KINDS = {8: Int8Linear, 4: Int4Linear}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).float()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _no_quantizing(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were quantized again")

    monkeypatch.setattr(Int8Linear, "quantize_", refuse)
    monkeypatch.setattr(Int4Linear, "quantize_", refuse)


# ---- quantize while loading ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bits", [8, 4])
def test_streaming_equals_load_then_quantize(tiny_checkpoint: Path, bits: int, dtype: str, monkeypatch) -> None:
    reference = visualglm.load(tiny_checkpoint, dtype=dtype, progress=False, fast_cpu_kernels=False)
    apply_quantization(reference, bits)
    # Quantizing after loading is never used by load(): the weights are quantized as they stream in.
    monkeypatch.setattr("visualglm.checkpoint.load.quantize_model", lambda *a, **k: pytest.fail("post-load"))
    model = visualglm.load(tiny_checkpoint, dtype=dtype, progress=False, fast_cpu_kernels=False, quantize=bits)
    kinds = [type(m) for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert kinds == [KINDS[bits]] * 4 * model.config.num_layers
    _assert_same_state(model, reference)
    assert torch.equal(_logits(model), _logits(reference))
    assert model.quantization["bits"] == bits
    assert all(b.device.type == "cpu" for b in model.buffers())


@pytest.mark.parametrize("bits", [8, 4])
def test_streaming_quantizes_each_weight_as_it_is_read(tiny_checkpoint: Path, bits: int, monkeypatch) -> None:
    """While loading, no planned linear ever holds a float weight, and each quantized module is filled
    right after its weight is read (load-then-quantize would hold every float weight until the end)."""
    from visualglm.checkpoint import load as load_module

    built: list[torch.nn.Module] = []
    real_build, real_iter = load_module.build_model, load_module.iter_tensors
    monkeypatch.setattr(load_module, "build_model", lambda config: built.append(real_build(config)) or built[-1])
    planned = [f"transformer.layers.{i}.{name}" for i in range(2) for name in
               ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
    float_weights_seen, filled_after_read = 0, []

    def tracking(path):
        nonlocal float_weights_seen
        for key, tensor in real_iter(path):
            yield key, tensor
            modules = [built[0].get_submodule(name) for name in planned]
            float_weights_seen = max(float_weights_seen, sum(
                isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.device.type != "meta"
                for m in modules))
            if key.removesuffix(".weight") in planned:
                module = built[0].get_submodule(key.removesuffix(".weight"))
                filled_after_read.append(next(iter(module.buffers())).device.type != "meta")

    monkeypatch.setattr(load_module, "iter_tensors", tracking)
    model = visualglm.load(tiny_checkpoint, dtype="float32", quantize=bits, progress=False)
    assert model is built[0]
    assert float_weights_seen == 0 and filled_after_read == [True] * 8


def test_streaming_hands_freed_memory_back_after_each_weight(tiny_checkpoint: Path, monkeypatch) -> None:
    """The temporaries of quantizing a weight are returned to the system before the next one is read
    (glibc would otherwise keep them as holes between the quantized buffers: ~1 GiB for VisualGLM-6B)."""
    from visualglm.checkpoint import io as io_module
    from visualglm.checkpoint import quantized as quantized_module

    calls = {"loader": 0, "end": 0}

    def counter(where: str):
        def count() -> None:
            calls[where] += 1
        return count

    monkeypatch.setattr(quantized_module, "release_freed_memory", counter("loader"))
    monkeypatch.setattr(io_module, "release_freed_memory", counter("end"))  # assign_weights' last step
    model = visualglm.load(tiny_checkpoint, quantize=4, progress=False)
    assert calls == {"loader": 4 * model.config.num_layers, "end": 1}


def test_release_freed_memory_is_safe_to_call() -> None:
    from visualglm.checkpoint.load import release_freed_memory

    release_freed_memory()
    release_freed_memory()


def test_streaming_visualglm_keeps_the_image_encoder(tiny_visual_checkpoint: Path) -> None:
    reference = visualglm.load(tiny_visual_checkpoint, progress=False, fast_cpu_kernels=False)
    apply_quantization(reference, 4)
    model = visualglm.load(tiny_visual_checkpoint, progress=False, fast_cpu_kernels=False, quantize="int4")
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.image_encoder.modules())
    assert isinstance(model.transformer.layers[0].mlp.dense_h_to_4h, Int4Linear)
    _assert_same_state(model, reference)


def test_streaming_reports_a_bad_weight(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    state = load_file(directory / "model.safetensors")
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    state[key] = state[key][:, :8].contiguous()
    del state["transformer.layers.0.attention.dense.bias"]
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"dense_4h_to_h.weight: shape \(64, 8\), expected \(64, 256\)"):
        visualglm.load(directory, quantize=8, progress=False)
    state[key] = state[key].repeat(1, 32)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): transformer.layers.0.attention.dense.bias"):
        visualglm.load(directory, quantize=4, progress=False)


# ---- our quantized checkpoints -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_save_and_load_quantized(tmp_path: Path, tiny_checkpoint: Path, bits: int, monkeypatch) -> None:
    model = visualglm.load(tiny_checkpoint, dtype="bfloat16", quantize=bits, progress=False)
    directory = save_checkpoint(model, tmp_path / f"int{bits}", max_shard_bytes=50_000)
    assert len(list(directory.glob("*.safetensors"))) > 1
    config = json.loads((directory / "config.json").read_text())
    entry = config["quantization_config"]
    assert entry["quant_method"] == "visualglm" and entry["format_version"] == 1 and entry["bits"] == bits
    assert entry["skip"] == ["lm_head"] and len(entry["modules"]) == 8
    assert entry.get("group_size") == (128 if bits == 4 else None)
    assert entry.get("group_size_overrides", {}) == ({name: 64 for name in entry["modules"]
                                                      if not name.endswith("dense_4h_to_h")} if bits == 4 else {})
    assert config["torch_dtype"] == "bfloat16" and config["quantization_bit"] == 0
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    name = "transformer.layers.0.mlp.dense_h_to_4h"
    if bits == 8:
        assert {f"{name}.weight", f"{name}.scale", f"{name}.bias"} <= set(index)
    else:
        assert {f"{name}.qweight", f"{name}.scales_and_zeros", f"{name}.bias"} <= set(index)
        assert f"{name}.weight" not in index
    _no_quantizing(monkeypatch)
    loaded = visualglm.load(directory, progress=False)
    _assert_same_state(loaded, model)
    assert torch.equal(_logits(loaded), _logits(model))
    again = visualglm.load(directory, progress=False, quantize=bits)  # same bits: accepted, nothing redone
    _assert_same_state(again, model)
    with pytest.raises(CheckpointError, match=f"already quantized to int{bits}"):
        visualglm.load(directory, progress=False, quantize=12 - bits)
    # Saving the loaded model again gives the same files' content.
    second = save_checkpoint(loaded, tmp_path / "again")
    assert json.loads((second / "config.json").read_text())["quantization_config"] == entry


def test_int4_checkpoint_loads_on_a_cpu_with_another_kernel_layout(tmp_path: Path, tiny_checkpoint: Path,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("VISUALGLM_CPU_KERNELS", "plain")  # PyTorch's own INT4 layout, whose block depends on the CPU
    model = visualglm.load(tiny_checkpoint, dtype="bfloat16", quantize=4, progress=False)
    directory = save_checkpoint(model, tmp_path / "int4")
    block = model.transformer.layers[0].mlp.dense_h_to_4h.block_n
    monkeypatch.setattr(qlinear, "_layout_block", lambda: 32 if block == 64 else 64)
    loaded = visualglm.load(directory, progress=False)
    layer = loaded.transformer.layers[0].mlp.dense_h_to_4h
    assert layer.block_n != block
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            assert torch.equal(loaded.get_submodule(name).dequantize(), module.dequantize()), name
    _assert_same_state(loaded, model)  # the state dict is the CPU-independent layout


def test_dequantized_model_saves_as_a_float_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = visualglm.load(tiny_checkpoint, quantize=8, progress=False)
    directory = save_checkpoint(model, tmp_path / "int8")
    plain = visualglm.load(tiny_checkpoint, progress=False)
    plain.config = visualglm.load(directory, progress=False).config  # carries quantization_config in extra
    out = save_checkpoint(plain, tmp_path / "float")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not any(quantized_bits(m) for m in visualglm.load(out, progress=False).modules())


@pytest.fixture
def int4_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    model = visualglm.load(tiny_checkpoint, dtype="bfloat16", quantize=4, progress=False)
    return save_checkpoint(model, tmp_path / "int4")


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    entry = config["quantization_config"]
    for key, value in changes.items():
        if key == "quantization_bit":
            config[key] = value
        elif value is None:
            entry.pop(key)
        else:
            entry[key] = value
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "message"), [
    ({"bits": 3}, "bits must be 4 or 8, got 3"),
    ({"format_version": 2}, "format_version 2 is newer than this visualglm reads"),
    ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
    ({"modules": ["transformer.layers.7.mlp.dense_h_to_4h"]}, "module 'transformer.layers.7.mlp.dense_h_to_4h' "
     "does not exist"),
    ({"modules": ["transformer.layers.0.input_layernorm"]}, "is not a linear layer"),
    ({"group_size": 48}, "group_size 48 is not one of"),
    ({"group_size_overrides": None, "group_size": 256}, "group size 256 does not fit"),
    ({"quantization_bit": 4}, "both quantization_bit"),
])
def test_inconsistent_quantization_config(int4_checkpoint: Path, changes: dict, message: str) -> None:
    _edit_config(int4_checkpoint, **changes)
    with pytest.raises(CheckpointError, match=message) as info:
        visualglm.load(int4_checkpoint, progress=False)
    assert "config.json" in str(info.value)


def test_inconsistent_quantized_tensors(int4_checkpoint: Path) -> None:
    path = int4_checkpoint / "model.safetensors"
    state = load_file(path)
    name = "transformer.layers.0.attention.dense"
    state[f"{name}.qweight"] = state[f"{name}.qweight"].view(torch.int8)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"attention.dense: qweight must be uint8"):
        visualglm.load(int4_checkpoint, progress=False)
    del state[f"{name}.qweight"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match=rf"missing 1 key\(s\): {name}.qweight"):
        visualglm.load(int4_checkpoint, progress=False)
    # Quantized tensors of a module the config does not list are unexpected.
    _edit_config(int4_checkpoint, modules=["transformer.layers.1.attention.dense"], group_size_overrides={},
                 group_size=64)
    with pytest.raises(CheckpointError, match="unexpected"):
        visualglm.load(int4_checkpoint, progress=False)


# ---- THUDM's chatglm-6b-int4 / int8 layout ------------------------------------------------------------
THUDM_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def _thudm_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """THUDM's rule (their quantization.py, written out independently): per-row fp16 scale
    max|W| / (2^(b-1) - 1), int8 round(W / scale); int4 packs element 2j in the high nibble, 2j+1 low.
    Returns (stored weight, stored scale, the weight the reference math uses)."""
    w = weight.half()
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    dequantized = q.float() * scale.float()[:, None]
    if bits == 4:
        nibbles = q.to(torch.int16) & 0xF
        q = ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).to(torch.uint8).view(torch.int8)
    return q, scale, dequantized


def _write_thudm(directory: Path, bits: int, fmt: str) -> torch.nn.Module:
    """A tiny ChatGLM in the chatglm-6b-int{bits} layout; returns the float model with the reference's
    dequantized weights (what THUDM's kernels compute with)."""
    model = random_chatglm()
    state = {k: v.half() for k, v in source_state_dict(model).items()}
    with torch.no_grad():
        for i in range(model.config.num_layers):
            for linear in THUDM_LINEARS:
                key = f"transformer.layers.{i}.{linear}"
                q, scale, dequantized = _thudm_quantize(state[f"{key}.weight"].float(), bits)
                state[f"{key}.weight"], state[f"{key}.weight_scale"] = q, scale
                model.get_submodule(key).weight.copy_(dequantized)
        for name, param in model.named_parameters():  # everything else as the fp16 file holds it
            if not any(name.endswith(f"{linear}.weight") for linear in THUDM_LINEARS):
                param.copy_(param.half().float())
    directory.mkdir()
    if fmt == "bin":
        torch.save({k: v.clone() for k, v in state.items()}, directory / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    config = model.config
    save_checkpoint(random_chatglm(), directory / "cfg")
    data = json.loads((directory / "cfg" / "config.json").read_text())
    data.update({"quantization_bit": bits, "torch_dtype": "float16"})
    (directory / "config.json").write_text(json.dumps(data))
    shutil.rmtree(directory / "cfg")
    assert config.num_layers == 2
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("bits", [8, 4])
def test_thudm_prequantized_checkpoint(tmp_path: Path, bits: int, fmt: str, monkeypatch) -> None:
    reference = _write_thudm(tmp_path / "thudm", bits, fmt)
    _no_quantizing(monkeypatch)
    model = visualglm.load(tmp_path / "thudm", dtype="float32", progress=False)
    for i in range(2):
        for linear in THUDM_LINEARS:
            name = f"transformer.layers.{i}.{linear}"
            module = model.get_submodule(name)
            assert quantized_bits(module) == bits, name  # KINDS[bits] or its CPU-kernel form
            want = reference.get_submodule(name).weight.detach()
            got = module.dequantize()
            if bits == 8:  # int8 values and fp16 scales are kept exactly
                assert torch.equal(got, want), name
            else:  # the per-row scale becomes every group's bf16 scale: 2^-9 relative at most
                assert torch.allclose(got, want, rtol=2**-8, atol=0), name
    assert isinstance(model.lm_head, torch.nn.Linear) and model.config.quantization_bit == bits
    got, want = _logits(model), _logits(reference)
    # Remaining differences: bf16 activations inside the weight-only kernels (~2^-9 per matmul).
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # Saved again, it is in our format and loads to the same model.
    saved = save_checkpoint(model, tmp_path / "ours")
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["source"] == f"THUDM int{bits}"
    _assert_same_state(visualglm.load(saved, dtype="float32", progress=False), model)


def test_thudm_checkpoint_errors(tmp_path: Path) -> None:
    _write_thudm(tmp_path / "thudm", 4, "safetensors")
    config_path = tmp_path / "thudm" / "config.json"
    with pytest.raises(CheckpointError, match="already quantized to int4"):
        visualglm.load(tmp_path / "thudm", quantize=8, progress=False)
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "quantization_bit": 8}))  # int4 tensors, config says 8
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.dense: shape \(64, 32\), expected \(64, 64\)"):
        visualglm.load(tmp_path / "thudm", progress=False)
    config_path.write_text(json.dumps({**config, "quantization_embeddings": True}))
    with pytest.raises(CheckpointError, match="quantization_embeddings"):
        visualglm.load(tmp_path / "thudm", progress=False)
    config_path.write_text(json.dumps({**config, "quantization_bit": 0}))  # float config, int4 tensors
    with pytest.raises(CheckpointError, match=r"dense.weight has shape \(64, 32\), the config expects"):
        visualglm.load(tmp_path / "thudm", progress=False)
    _write_thudm(tmp_path / "int8", 8, "safetensors")
    config_path = tmp_path / "int8" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "quantization_bit": 0}))
    with pytest.raises(CheckpointError, match=r"unexpected 8 key\(s\): .*weight_scale"):
        visualglm.load(tmp_path / "int8", progress=False)
