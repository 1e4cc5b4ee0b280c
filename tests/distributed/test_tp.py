"""Tensor parallelism on CPU (gloo, 2 processes): the same greedy output and logits as one process."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import GOLDEN_DIR, REPO_ROOT, make_png
from tests.distributed import tp_worker
from visualglm.checkpoint.load import build_model
from visualglm.config import get_config
from visualglm.demo import DEMO_MODEL_DIR
from visualglm.distributed.tp import ShardSpec, TensorParallelError, apply_tensor_parallel, shard_quantized
from visualglm.families import family_spec
from visualglm.quant.linear import Int4Linear, Int8Linear

WORLD = 2


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
            "PYTHONFAULTHANDLER": "1"}  # a crashed rank prints its Python stack


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", *args]


@pytest.fixture(scope="module")
def cases(tiny_checkpoint, tiny_chat_checkpoint, tiny_visual_checkpoint, glm4v_checkpoint,
          tmp_path_factory) -> dict[str, dict]:
    image = make_png(tmp_path_factory.mktemp("img") / "red.png")
    chat = str(tiny_chat_checkpoint)
    return {
        "chatglm": {"path": chat},
        "visualglm": {"path": str(tiny_visual_checkpoint), "image": str(image)},
        "glm4v": {"path": str(glm4v_checkpoint), "image": str(GOLDEN_DIR / "glm-4v-9b" / "image.png")},
        "chatglm_int8": {"path": chat, "quant": 8},  # each rank quantizes its slices while loading
        "chatglm_int8_sliced": {"path": chat, "quant": 8, "quant_then_split": True},
        # the shipped demo model: tied embeddings, a vocabulary of 541 (the last rank's rows are padded)
        "demo": {"path": str(DEMO_MODEL_DIR), "image": str(DEMO_MODEL_DIR.parent / "examples" / "example-1.png")},
        # tied word embedding and output layer (chatglm-tiny's default), no tokenizer: one forward pass
        "chatglm_tied": {"path": str(tiny_checkpoint), "ids": [5, 6, 7, 8, 1001, 1004, 9, 10]},
    }


@pytest.fixture(scope="module")
def parallel(cases, tmp_path_factory) -> list[dict]:
    """What each of the two ranks computed (one torchrun for every case)."""
    out = tmp_path_factory.mktemp("tp")
    (out / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
    worker = str(Path(tp_worker.__file__))
    done = subprocess.run(_torchrun(worker, str(out), str(out / "cases.json")), env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single(cases) -> dict[str, dict]:
    return tp_worker.run_cases(cases)


@pytest.mark.parametrize("name", ["chatglm", "visualglm", "glm4v", "demo", "chatglm_int8_sliced"])
def test_two_ranks_match_one_process(name, parallel, single) -> None:
    ref, rank0, rank1 = single[name], parallel[0][name], parallel[1][name]
    assert rank0["tokens"] == ref["tokens"]
    assert rank0["texts"] == ref["texts"]
    torch.testing.assert_close(rank0["logits"], ref["logits"], atol=1e-4, rtol=0)
    # Every rank ends with the same logits (gathered) and so the same tokens.
    assert torch.equal(rank0["logits"], rank1["logits"]) and rank0["texts"] == rank1["texts"]
    # Each rank's KV cache holds its share of the heads (GLM-4: of the key/value groups).
    assert rank0["cache_heads"] * WORLD == ref["cache_heads"]


def test_tied_embedding_and_output_layer(parallel, single) -> None:
    torch.testing.assert_close(parallel[0]["chatglm_tied"]["logits"], single["chatglm_tied"]["logits"], atol=1e-4,
                               rtol=0)


def test_quantized_shards_match_within_quantization_error(parallel, single) -> None:
    """Quantizing each rank's slices gives per-row INT8 scales over half a row in the row-parallel layers:
    not bit-equal to quantizing the full model, but closer to it than INT8 is to the float model."""
    ref, tp = single["chatglm_int8"], parallel[0]["chatglm_int8"]
    assert tp["tokens"] == ref["tokens"] and tp["texts"] == ref["texts"]
    quantization_error = (single["chatglm"]["logits"] - ref["logits"]).abs().max()
    assert (tp["logits"] - ref["logits"]).abs().max() <= quantization_error


def test_cli_chat_under_torchrun_matches_one_process(tiny_visual_checkpoint, tmp_path, capsys,
                                                     monkeypatch) -> None:
    """``torchrun -m visualglm chat``: rank 0 reads stdin (an image, two turns) and prints; the transcript,
    sampled with a seed, equals the single-process one."""
    from visualglm.cli.main import main

    image = make_png(tmp_path / "red.png")
    script = f"{image}\nhello\nwhat color?\nstop\n"
    flags = ["chat", "--model", str(tiny_visual_checkpoint), "--seed", "7", "--max-new-tokens", "6", "--dtype",
             "float32"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(flags) == 0
    expected = capsys.readouterr().out
    done = subprocess.run(_torchrun("-m", "visualglm", *flags), input=script, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == expected  # one transcript: rank 1 is silent
    assert expected.count("VisualGLM-6B: ") == 2


def test_tp_flag_relaunches_under_torchrun(monkeypatch) -> None:
    from visualglm.cli.main import main
    from visualglm.distributed import launch

    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    monkeypatch.setattr(sys, "argv", ["visualglm", "ask", "--tp", "2", "--greedy", "hi"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(sys.argv[1:]) == 0
    (command, env), = calls
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "visualglm",
                           "ask", "--greedy", "hi"]
    assert int(env["OMP_NUM_THREADS"]) >= 1


@pytest.mark.parametrize(("name", "overrides", "world", "message"), [
    ("chatglm-tiny", {}, 3, "cannot split 4 attention heads evenly over 3 ranks"),
    ("chatglm-tiny", {"inner_hidden_size": 250}, 4, "cannot split 250 MLP features"),
    ("visualglm-tiny", {}, 8, "cannot split 4 attention heads evenly over 8 ranks"),
    ("glm-4v-tiny", {"num_attention_heads": 6}, 3, "cannot split 2 key/value groups"),
    ("glm-4v-tiny", {"ffn_hidden_size": 90}, 4, "cannot split 90 MLP features"),
])
def test_uneven_split_names_the_count(name, overrides, world, message) -> None:
    model = build_model(dataclasses.replace(get_config(name), **overrides))
    with pytest.raises(TensorParallelError, match=message):
        apply_tensor_parallel(model, rank=0, world_size=world)


def test_glm4_groups_replicate_when_ranks_outnumber_them() -> None:
    """4 ranks, 2 key/value groups: each rank keeps the group its one query head reads."""
    model = build_model(get_config("glm-4v-tiny"))  # 4 heads, 2 groups, head_dim 16
    sharding = apply_tensor_parallel(model, rank=2, world_size=4)
    attention = model.transformer.encoder.layers[0].self_attention
    assert (attention.heads, attention.kv_heads) == (1, 1) and model.kv_cache_layout() == (1, 16)
    spec = sharding.specs["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    # rows: 64 query rows, then 32 key rows, then 32 value rows; rank 2 has query head 2 and group 1
    assert spec.ranges == ((32, 16), (64 + 16, 16), (96 + 16, 16))
    assert attention.query_key_value.weight.shape == (48, 64)


@pytest.mark.parametrize("family_config", ["chatglm-tiny", "glm-4v-tiny"])
def test_rank_slices_tile_every_split_tensor(family_config) -> None:
    """The column-parallel rows (row-parallel columns) of the ranks cover each weight exactly once."""
    config = get_config(family_config)
    specs = [apply_tensor_parallel(build_model(config), rank=r, world_size=WORLD).specs for r in range(WORLD)]
    plan = family_spec(config).tp_plan
    full = build_model(config)
    for name, param in full.named_parameters():
        if name not in specs[0] or specs[0][name].zero or name.startswith(plan.embedding):
            continue
        dim = specs[0][name].dim
        covered = sorted(r for spec in specs for start, length in spec[name].ranges
                         for r in range(start, start + length))
        assert covered == list(range(param.shape[dim])), name


def test_chatglm_qkv_split_keeps_whole_heads() -> None:
    """ChatGLM's fused QKV rows are [q_h | k_h | v_h] per head: rank 1 of 2 holds heads 2 and 3 entire."""
    model = build_model(get_config("chatglm-tiny"))  # 4 heads of 16
    sharding = apply_tensor_parallel(model, rank=1, world_size=2)
    assert sharding.specs["transformer.layers.0.attention.query_key_value.weight"].ranges == ((2 * 48, 2 * 48),)
    assert model.transformer.layers[0].attention.num_heads == 2


def test_sliced_quantized_linears_equal_slices_of_the_full_one() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64)
    for module in (Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group_size=64)):
        full = module.dequantize()
        column = shard_quantized(module, ShardSpec(0, ((32, 32),)), keep_bias=True)
        row = shard_quantized(module, ShardSpec(1, ((128, 128),)), keep_bias=False)
        torch.testing.assert_close(column.dequantize(), full[32:], atol=0, rtol=0)
        torch.testing.assert_close(row.dequantize(), full[:, 128:], atol=0, rtol=0)
        assert torch.equal(column.bias, module.bias[32:]) and not row.bias.any()
    with pytest.raises(TensorParallelError, match="groups of 64"):
        shard_quantized(Int4Linear.from_linear(linear, group_size=64), ShardSpec(1, ((32, 32),)), keep_bias=True)
