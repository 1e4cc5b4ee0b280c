"""Tiny random checkpoints the project writes itself: a GLM-4V-9B-layout one with its own GLM-4 tokenizer
loads like the official checkpoint and runs."""

from __future__ import annotations

import base64

import torch

import visualglm
from visualglm.checkpoint.tiny import write_tiny_random_checkpoint
from visualglm.config import read_config
from visualglm.tokenizers.glm4 import GLM4Tokenizer, load_ranks
from visualglm.tokenizers.tiny import write_glm4_ranks


def test_glm4_ranks_hold_every_byte_and_build_whole_words(tmp_path) -> None:
    path = write_glm4_ranks(tmp_path, ["red square red", "红色 方形"])
    ranks = load_ranks(path)  # the loader's own checks: every byte, no repeats
    assert {bytes([b]) for b in range(256)} <= set(ranks)
    assert {b"red", b" red", b" square", "红".encode()} <= set(ranks)
    tokenizer = GLM4Tokenizer.from_pretrained(tmp_path)
    assert [tokenizer.decode([i]) for i in tokenizer.encode("red red")] == ["red", " red"]
    assert tokenizer.decode(tokenizer.encode("a blue 红色 circle?")) == "a blue 红色 circle?"
    # Every line is "<base64> <rank>", ranks 0..n-1 in order.
    lines = path.read_text(encoding="ascii").splitlines()
    assert [int(line.split()[1]) for line in lines] == list(range(len(lines)))
    assert base64.b64decode(lines[ord("r")].split()[0]) == b"r"


def test_a_tiny_glm4v_checkpoint_loads_with_its_tokenizer_and_runs(tmp_path) -> None:
    path = write_tiny_random_checkpoint(tmp_path / "glm4v", family="glm4v", hidden_size=64, num_layers=2,
                                        num_attention_heads=4, kv_channels=16, ffn_hidden_size=96)
    config = read_config(path)
    tokenizer = visualglm.load_tokenizer(str(path))
    assert config.family == "glm4v" and config.num_layers == 2
    assert config.eos_token_id == [tokenizer.eos_token_id, tokenizer.user_token_id, tokenizer.observation_token_id]
    assert (config.pad_token_id, config.boi_token_id, config.eoi_token_id) == (
        tokenizer.eos_token_id, tokenizer.boi_token_id, tokenizer.eoi_token_id)
    assert tokenizer.vocab_size <= config.padded_vocab_size and config.padded_vocab_size % 64 == 0
    model = visualglm.load(str(path), progress=False)
    ids, _ = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}])
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), config.padded_vocab_size) and bool(torch.isfinite(logits).all())
