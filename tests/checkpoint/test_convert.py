"""``visualglm convert``: sat -> HF and HF -> HF, through the library, ``main([...])`` and a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import visualglm
from visualglm.checkpoint import convert as convert_module
from visualglm.checkpoint.convert import convert_checkpoint, parse_size
from visualglm.checkpoint.load import CheckpointError
from visualglm.checkpoint.sat import save_sat
from visualglm.checkpoint.save import save_checkpoint
from visualglm.cli.main import main

from ..conftest import random_chatglm


def _logits(model: torch.nn.Module) -> torch.Tensor:
    config = model.config
    prompt = torch.tensor([[20, 21, 22, config.gmask_token_id, config.bos_token_id]])
    with torch.no_grad():
        return model(prompt).float()


def _image_embeds(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.encode_images(images).float()


def _stored_dtypes(directory: Path) -> dict[str, torch.dtype]:
    dtypes = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            dtypes.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()})  # noqa: SIM118
    return dtypes


@pytest.fixture(scope="module")
def visual() -> torch.nn.Module:
    return random_chatglm("visualglm-tiny", tie_word_embeddings=False)


@pytest.fixture()
def sat_visual(tmp_path: Path, visual: torch.nn.Module) -> Path:
    directory = save_sat(visual, tmp_path / "sat", mp_size=2, qkv_layout="contiguous")
    (directory / "ice_text.model").write_bytes(b"sentencepiece model bytes")
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "ChatGLMTokenizer"}')
    return directory


def test_sat_to_hf_through_main(tmp_path: Path, sat_visual: Path, visual: torch.nn.Module, capsys) -> None:
    target = tmp_path / "hf"
    assert main(["convert", str(sat_visual), str(target)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {target}: VisualGLM-6B" in out and "ice_text.model, tokenizer_config.json" in out
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "ice_text.model", "model.safetensors",
                                                        "tokenizer_config.json"]
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["eva_config"]["num_layers"] == 2
    assert "qkv_layout" not in config and "model_class" not in config  # sat bookkeeping stays out
    model = visualglm.load(target, progress=False)
    assert torch.equal(_logits(model), _logits(visual))
    assert torch.equal(_image_embeds(model), _image_embeds(visual))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"


def test_hf_to_hf_round_trip_with_shards(tmp_path: Path, tiny_visual_checkpoint: Path) -> None:
    target = tmp_path / "sharded"
    assert main(["convert", str(tiny_visual_checkpoint), str(target), "--shard-size", "100KB"]) == 0
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (target / "ice_text.model").read_bytes() == (tiny_visual_checkpoint / "ice_text.model").read_bytes()
    original = visualglm.load(tiny_visual_checkpoint, progress=False)
    converted = visualglm.load(target, progress=False)
    assert torch.equal(_logits(converted), _logits(original))
    assert torch.equal(_image_embeds(converted), _image_embeds(original))
    assert json.loads((target / "config.json").read_text()) == json.loads(
        (tiny_visual_checkpoint / "config.json").read_text())


def test_stored_dtypes_are_kept_unless_asked(tmp_path: Path, visual: torch.nn.Module) -> None:
    mixed = random_chatglm("visualglm-tiny", tie_word_embeddings=False)
    mixed.transformer.half()
    mixed.lm_head.half()  # like the official HF checkpoint: fp16 language model, fp32 image encoder
    source = save_checkpoint(mixed, tmp_path / "mixed")
    kept = convert_checkpoint(source, tmp_path / "kept", progress=False)
    dtypes = _stored_dtypes(kept.directory)
    assert dtypes["transformer.word_embeddings.weight"] == "F16" and dtypes["image_encoder.glm_proj.weight"] == "F32"
    assert kept.dtype == "float16+float32"
    assert main(["convert", str(source), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert set(_stored_dtypes(tmp_path / "bf16").values()) == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_interleaved_sat_through_a_subprocess(tmp_path: Path) -> None:
    model = random_chatglm()
    source = save_sat(model, tmp_path / "sat", qkv_layout="interleaved")
    source.joinpath("model_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads(source.joinpath("model_config.json").read_text()).items() if k != "qkv_layout"}))
    target = tmp_path / "hf"
    command = [sys.executable, "-m", "visualglm", "convert", str(source), str(target)]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert refused.returncode == 2 and "--qkv-layout" in refused.stderr and not target.exists()
    done = subprocess.run([*command, "--qkv-layout", "interleaved", "--dtype", "float32"], capture_output=True,
                          text=True, timeout=120, check=False, env=env)
    assert done.returncode == 0, done.stderr
    assert "ChatGLM-6B" in done.stdout and "none found in SRC" in done.stdout
    assert torch.equal(_logits(visualglm.load(target, progress=False)), _logits(model))


# ---- refusals -----------------------------------------------------------------------------------------------
def test_target_not_empty(tmp_path: Path, sat_visual: Path, capsys) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(["convert", str(sat_visual), str(target)]) == 2
    assert "exists and is not empty (pass --overwrite to replace it)" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert main(["convert", str(sat_visual), str(target), "--overwrite"]) == 0
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


def test_empty_target_directory_is_fine(tmp_path: Path, sat_visual: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(sat_visual), str(tmp_path / "empty")]) == 0


def test_bad_flags(tmp_path: Path, sat_visual: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["convert", str(sat_visual), str(tmp_path / "x"), "--qkv-layout", "qkv"])
    assert info.value.code == 2 and "invalid choice: 'qkv'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(sat_visual), str(tmp_path / "x"), "--shard-size", "lots"])
    assert "cannot read a size from 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(sat_visual), str(tmp_path / "x"), "--dtype", "int8"])
    assert not (tmp_path / "x").exists()


def test_qkv_layout_flag_on_hf_source(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "x"), "--qkv-layout", "contiguous"]) == 2
    assert "applies to sat checkpoints only" in capsys.readouterr().err


def test_target_inside_source_is_refused(sat_visual: Path) -> None:
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_checkpoint(sat_visual, sat_visual / "hf", progress=False)
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_checkpoint(sat_visual, sat_visual, overwrite=True, progress=False)


def test_broken_source_leaves_nothing(tmp_path: Path, sat_visual: Path, capsys) -> None:
    (sat_visual / "latest").unlink()
    assert main(["convert", str(sat_visual), str(tmp_path / "out")]) == 2
    assert "no 'latest' file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sat"]


def test_failure_while_writing_leaves_no_half_target(tmp_path: Path, sat_visual: Path, monkeypatch) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous conversion")

    def failing_copy(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(sat_visual, target, overwrite=True, progress=False)
    assert [p.name for p in target.iterdir()] == ["old.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sat"]  # no staging left


def test_sat_errors_are_checkpoint_errors(tmp_path: Path, sat_visual: Path) -> None:
    (sat_visual / "1" / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt"):
        convert_checkpoint(sat_visual, tmp_path / "out", progress=False)


@pytest.mark.parametrize(("text", "expected"), [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                                ("100kb", 100_000), ("4096", 4096), ("2G", 2 * 2**30), (7, 7)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2XB", "-1", "0", "1.5.2GB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
