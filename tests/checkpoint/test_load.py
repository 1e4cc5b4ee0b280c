"""visualglm.load on checkpoints the tests write in the official layouts, and its error messages."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import visualglm
from visualglm.checkpoint.hub import CheckpointNotFound
from visualglm.checkpoint.load import CheckpointError
from visualglm.checkpoint.save import save_checkpoint, source_state_dict

from ..conftest import random_chatglm

PROMPT = torch.tensor([[20, 21, 22, 1001, 1004]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).float()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_round_trip_single_file(tiny_checkpoint: Path) -> None:
    model = visualglm.load(tiny_checkpoint, progress=False)
    reference = random_chatglm()
    assert torch.equal(_logits(model), _logits(reference))
    assert model.config.family == "chatglm" and model.checkpoint_dir == tiny_checkpoint
    assert not any(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_sharded_safetensors_with_index(tmp_path: Path) -> None:
    reference = random_chatglm()
    directory = save_checkpoint(reference, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert torch.equal(_logits(visualglm.load(directory, progress=False)), _logits(reference))


def _write_bin(directory: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    directory.mkdir()
    keys = sorted(state)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        weight_map = {}
        for i in range(shards):
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = {k: state[k].clone() for k in keys[i::shards]}
            torch.save(part, directory / name)
            weight_map.update({k: name for k in part})
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoints(tmp_path: Path, tiny_checkpoint: Path, shards: int) -> None:
    reference = random_chatglm()
    state = {k: v.half() for k, v in source_state_dict(reference).items()}  # the official fp16 pickles
    state = {k: v.clone() for k, v in state.items()}
    state["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)  # ignored, as in the reference
    directory = tmp_path / "bin"
    _write_bin(directory, state, shards)
    shutil.copy(tiny_checkpoint / "config.json", directory / "config.json")
    model = visualglm.load(directory, dtype="float32", progress=False)
    assert (_logits(model) - _logits(reference.half().float())).abs().max() < 1e-4


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                                 (None, torch.float32)])
def test_target_dtype(tiny_checkpoint: Path, dtype: str | None, expected: torch.dtype) -> None:
    model = visualglm.load(tiny_checkpoint, dtype=dtype, progress=False)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_fp16_checkpoint_defaults_to_bf16_on_cpu(tmp_path: Path) -> None:
    directory = save_checkpoint(random_chatglm(), tmp_path / "fp16", dtype=torch.float16)
    assert json.loads((directory / "config.json").read_text())["torch_dtype"] == "float16"
    assert next(visualglm.load(directory, progress=False).parameters()).dtype == torch.bfloat16


def test_save_refuses_to_overwrite(tmp_path: Path, tiny_checkpoint: Path) -> None:
    target = _copy(tiny_checkpoint, tmp_path / "existing")
    with pytest.raises(FileExistsError, match="not empty"):
        save_checkpoint(random_chatglm(), target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"


# ---- errors -------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        visualglm.load(tmp_path / "nope")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        visualglm.load(tmp_path)


def test_missing_shard(tmp_path: Path) -> None:
    directory = save_checkpoint(random_chatglm(), tmp_path / "sharded", max_shard_bytes=100_000)
    victim = sorted(directory.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {victim.name}"):
        visualglm.load(directory)


def test_no_weight_files(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = _copy(tiny_checkpoint, tmp_path / "c")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        visualglm.load(directory)


def test_truncated_safetensors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = _copy(tiny_checkpoint, tmp_path / "c")
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        visualglm.load(directory, progress=False)


def test_garbage_safetensors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = _copy(tiny_checkpoint, tmp_path / "c")
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        visualglm.load(directory, progress=False)


def test_truncated_pickle(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = tmp_path / "bin"
    _write_bin(directory, source_state_dict(random_chatglm()), 1)
    shutil.copy(tiny_checkpoint / "config.json", directory / "config.json")
    data = (directory / "pytorch_model.bin").read_bytes()
    (directory / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a readable PyTorch checkpoint"):
        visualglm.load(directory, progress=False)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    directory = tmp_path / "evil"
    directory.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", directory / "config.json")
    torch.save({"transformer.word_embeddings.weight": _Exploit()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*pytorch_model.bin"):
        visualglm.load(directory, progress=False)
    assert "this must never run" not in capsys.readouterr().out


def test_shape_mismatch(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = _copy(tiny_checkpoint, tmp_path / "c")
    config = json.loads((directory / "config.json").read_text())
    config["inner_hidden_size"] = 128
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: transformer.layers.0.mlp.dense_(h_to_4h|4h_to_h)"
                                              r".weight has shape \((256, 64|64, 256)\), the config expects"):
        visualglm.load(directory, progress=False)


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = _copy(tiny_checkpoint, tmp_path / "c")
    state = load_file(directory / "model.safetensors")
    del state["transformer.final_layernorm.bias"]
    state["transformer.extra_head.weight"] = torch.zeros(2)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        visualglm.load(directory, progress=False)
    assert "missing 1 key(s): transformer.final_layernorm.bias" in str(info.value)
    assert "unexpected 1 key(s): transformer.extra_head.weight" in str(info.value)


def test_unknown_model_type(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = _copy(tiny_checkpoint, tmp_path / "c")
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        visualglm.load(directory)


def test_unknown_dtype(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        visualglm.load(tiny_checkpoint, dtype="float8")


def test_hub_id_offline_says_how_to_pass_a_path() -> None:
    pytest.importorskip("huggingface_hub")
    with pytest.raises(CheckpointNotFound, match=r"could not download 'THUDM/chatglm-6b'.*local directory") as info:
        visualglm.load("chatglm-6b")
    assert "\n" not in str(info.value)  # one line, whatever the hub library's message looks like


def test_hub_id_without_huggingface_hub(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(CheckpointNotFound, match=r"pip install 'visualglm\[hub\]'.*local directory"):
        visualglm.load("THUDM/chatglm-6b")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_follows_the_plan(tiny_checkpoint: Path, bits: int) -> None:
    from visualglm.quant.linear import quantized_bits

    model = visualglm.load(tiny_checkpoint, dtype="bfloat16", quantize=bits, progress=False)
    quantized = [name for name, module in model.named_modules() if quantized_bits(module) == bits]
    assert len(quantized) == 4 * model.config.num_layers  # qkv, dense, h_to_4h, 4h_to_h per layer
    assert quantized_bits(model.lm_head) is None  # kept in floating point, as the reference does
    reference = visualglm.load(tiny_checkpoint, dtype="bfloat16", progress=False)
    got, want = _logits(model), _logits(reference)
    assert ((got - want).norm() / want.norm()).item() < (0.05 if bits == 8 else 0.35)


def test_quantize_value_is_checked(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="quantize must be 8, 4"):
        visualglm.load(tiny_checkpoint, quantize=3)


def test_public_load_has_the_loaders_keyword_arguments() -> None:
    """``visualglm.load`` spells out ``checkpoint.load.load``'s arguments (names, kinds, defaults), so the
    public signature cannot fall behind the loader."""
    import inspect

    from visualglm.checkpoint.load import load as checkpoint_load

    def params(function) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    assert params(visualglm.load) == params(checkpoint_load)
