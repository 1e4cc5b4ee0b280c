"""``visualglm quantize``: the written checkpoint, its use by ``visualglm ask``, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from visualglm.cli.main import main


def _ask(model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visualglm", "ask", "--model", str(model), "--greedy",
                           "--max-new-tokens", "6", *extra, "hello"], capture_output=True, text=True,
                          timeout=120, check=False, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_quantize_then_ask(tiny_chat_checkpoint: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "int4"
    assert main(["quantize", str(tiny_chat_checkpoint), str(target), "--bits", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "8 linears in INT4 (group 128)" in out and "ice_text.model" in out
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "ice_text.model", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["int4"]  # no staging directory left behind
    entry = json.loads((target / "config.json").read_text())["quantization_config"]
    assert entry["bits"] == 4 and entry["group_size"] == 128
    # The quantized checkpoint answers exactly like quantizing the source on load.
    from_file = _ask(target)
    on_load = _ask(tiny_chat_checkpoint, "--quant", "4")
    assert from_file.returncode == 0 and on_load.returncode == 0, from_file.stderr + on_load.stderr
    assert from_file.stdout == on_load.stdout and from_file.stdout.strip()


def test_quantize_refuses_to_overwrite(tiny_chat_checkpoint: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    assert main(["quantize", str(tiny_chat_checkpoint), str(target), "--bits", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty (pass --overwrite" in err
    assert (target / "keep.txt").is_file()
    assert main(["quantize", str(tiny_chat_checkpoint), str(target), "--bits", "8", "--force"]) == 0
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    assert json.loads((target / "config.json").read_text())["quantization_config"]["bits"] == 8


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "8", "--group-size", "64"], "group size applies to INT4 only"),
    (["--bits", "4", "--src-missing"], "does not exist"),
    (["--bits", "8", "--into-source"], "overlaps the source"),
])
def test_quantize_errors_are_one_line(tiny_chat_checkpoint: Path, tmp_path: Path, capsys, args: list[str],
                                      message: str) -> None:
    source, target = str(tiny_chat_checkpoint), str(tmp_path / "out")
    if "--src-missing" in args:
        args.remove("--src-missing")
        source = str(tmp_path / "nothing-here")
    if "--into-source" in args:
        args.remove("--into-source")
        target = str(tiny_chat_checkpoint / "sub")
    assert main(["quantize", source, target, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visualglm quantize: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_quantize_already_quantized_to_other_width(tiny_chat_checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert main(["quantize", str(tiny_chat_checkpoint), str(tmp_path / "int8"), "--bits", "8"]) == 0
    assert main(["quantize", str(tmp_path / "int8"), str(tmp_path / "int4"), "--bits", "4"]) == 2
    assert "already quantized to int8" in capsys.readouterr().err
