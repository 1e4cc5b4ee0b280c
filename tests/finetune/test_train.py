"""The training loop: exact resume, data parallel = single process, the three methods, CLI round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import visualglm
from tests.conftest import REPO_ROOT, make_png
from visualglm.cli.main import main
from visualglm.finetune.data import load_examples
from visualglm.finetune.train import TrainConfig, sample_order, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    for name, rgb in colors.items():
        make_png(folder / f"{name}.png", rgb)
    rows = [{"img": f"{c}.png", "prompt": "What color is it?", "label": c} for c in colors] * 2
    rows += [{"prompt": "Say hi", "label": "hi"}, {"prompt": "Say no", "label": "no"}]
    (folder / "train.json").write_text(json.dumps(rows))
    return folder / "train.json"


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(checkpoint, data, out, config: TrainConfig, **kwargs) -> dict:
    tokenizer = visualglm.load_tokenizer(checkpoint)
    model = visualglm.load(checkpoint, progress=False)
    examples, _ = load_examples(data, tokenizer, model.config)
    return train(model, tokenizer, examples, out, config, progress=False, base_model=str(checkpoint), **kwargs)


def test_sample_order_is_a_stream_of_epoch_permutations() -> None:
    steps = [sample_order(s, 4, 6, seed=3) for s in range(3)]
    flat = sum(steps, [])
    assert sorted(flat[:6]) == list(range(6)) and sorted(flat[6:12]) == list(range(6))
    assert steps == [sample_order(s, 4, 6, seed=3) for s in range(3)]


def test_resumed_run_replays_the_uninterrupted_losses(tmp_path, tiny_visual_checkpoint, dataset) -> None:
    config = dict(method="lora", steps=5, batch_size=2, lr=5e-2, lora_dropout=0.1, lora_rank=4, lora_alpha=8)
    straight = _run(tiny_visual_checkpoint, dataset, tmp_path / "a", TrainConfig(**config))
    assert straight["steps"] == 5
    partial = _run(tiny_visual_checkpoint, dataset, tmp_path / "b", TrainConfig(**config), stop_after=2)
    assert partial["steps"] == 2 and not (tmp_path / "b" / "adapter_config.json").exists()
    _run(tiny_visual_checkpoint, dataset, tmp_path / "b", TrainConfig(**config), resume=True)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png"):
        assert (tmp_path / "b" / name).is_file()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-2", "step-5"]


@pytest.mark.parametrize("method", ["ptuning", "qlora"])
def test_other_methods_learn(tmp_path, tiny_visual_checkpoint, dataset, method) -> None:
    # Full-batch steps (8 examples): every step sees the same data, so the loss must go down.
    config = TrainConfig(method=method, steps=5, batch_size=8, lr=5e-2 if method == "ptuning" else 2e-2,
                         pre_seq_len=4, lora_rank=4, lora_alpha=16, warmup=0)
    summary = _run(tiny_visual_checkpoint, dataset, tmp_path, config)
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0] and summary["trainable_parameters"] > 0
    meta = json.loads((tmp_path / "visualglm_adapter.json").read_text())
    assert meta["method"] == method and meta["quant_bits"] == (4 if method == "qlora" else None)


def test_activation_checkpointing_and_accumulation_do_not_change_the_losses(tmp_path, tiny_visual_checkpoint,
                                                                           dataset) -> None:
    config = dict(method="lora", steps=2, batch_size=4, lr=1e-2)
    _run(tiny_visual_checkpoint, dataset, tmp_path / "a", TrainConfig(**config))
    _run(tiny_visual_checkpoint, dataset, tmp_path / "b",
         TrainConfig(**config, activation_checkpointing=True, micro_batch_size=1))
    torch.testing.assert_close(_losses(tmp_path / "b"), _losses(tmp_path / "a"), atol=1e-5, rtol=1e-5)


def test_two_processes_match_one_and_the_adapter_serves(tmp_path, tiny_visual_checkpoint, dataset, capsys) -> None:
    args = ["finetune", "--model", str(tiny_visual_checkpoint), "--data", str(dataset), "--steps", "3",
            "--batch-size", "4", "--lr", "2e-2", "--lora-alpha", "16", "--quiet", "--layer-range", "0", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    result = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "visualglm", *args,
                             "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(_losses(tmp_path / "two"), _losses(tmp_path / "one"), atol=1e-5, rtol=1e-5)

    # The adapter: merged into a full checkpoint, it gives the logits of base + adapter.
    from visualglm.peft import apply_adapter

    assert main(["merge-lora", "--model", str(tiny_visual_checkpoint), "--adapter", str(tmp_path / "one"),
                 "--out", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([[5, 6, 7, 8]])
    with_adapter = apply_adapter(visualglm.load(tiny_visual_checkpoint, progress=False), tmp_path / "one")
    merged = visualglm.load(tmp_path / "merged", progress=False)
    torch.testing.assert_close(merged.transformer.word_embeddings(ids), with_adapter.transformer.word_embeddings(ids))
    positions, mask = merged.prompt_inputs(torch.tensor([[5, 6, 7, merged.config.gmask_token_id,
                                                          merged.config.bos_token_id]]))
    x = torch.tensor([[5, 6, 7, merged.config.gmask_token_id, merged.config.bos_token_id]])
    torch.testing.assert_close(merged(x, positions, mask), with_adapter(x, positions, mask), atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    assert main(["ask", "--model", str(tiny_visual_checkpoint), "--adapter", str(tmp_path / "one"), "--greedy",
                 "--max-new-tokens", "3", "hello"]) == 0


def test_glm4v_lora_trains_on_chat_data_with_an_image(tmp_path, glm4v_checkpoint) -> None:
    make_png(tmp_path / "red.png")
    rows = [{"messages": [{"role": "user", "content": "what color?", "image": "red.png"},
                          {"role": "assistant", "content": "red"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye"}]}]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    config = TrainConfig(method="lora", steps=4, batch_size=2, lr=5e-2, lora_dropout=0.0, warmup=0)
    summary = _run(glm4v_checkpoint, data, tmp_path / "out", config)
    losses = _losses(tmp_path / "out")
    assert summary["adapted"] == 2 and losses[-1] < losses[0]
