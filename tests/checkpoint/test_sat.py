"""sat (SwissArmyTransformer) checkpoints: QKV row order, model-parallel merge, config mapping, errors.

Every checkpoint here is written by the tests themselves (``save_sat``) from tiny random models."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import visualglm
from visualglm.checkpoint.keymaps import map_key
from visualglm.checkpoint.load import CheckpointError
from visualglm.checkpoint.sat import (
    config_from_sat,
    convert_qkv_layout,
    detect_qkv_layout,
    load_sat,
    merge_model_parallel,
    qkv_row_permutation,
    save_sat,
    split_kind,
    split_model_parallel,
)
from visualglm.config import get_config
from visualglm.families import FAMILIES, family_spec
from visualglm.families.chatglm import CHATGLM_SAT
from visualglm.families.visualglm import VISUALGLM_SAT

from ..conftest import random_chatglm

PROMPT = torch.tensor([[20, 21, 22, 1001, 1004]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).float()


def _image_embeds(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.encode_images(images).float()


def _model(family: str, tie: bool = False) -> torch.nn.Module:
    return random_chatglm(f"{family}-tiny", tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def chatglm() -> torch.nn.Module:
    return _model("chatglm")


@pytest.fixture(scope="module")
def visual() -> torch.nn.Module:
    return _model("visualglm")


def _rank(directory: Path, rank: int = 0) -> Path:
    return directory / "1" / f"mp_rank_{rank:02d}_model_states.pt"


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "model_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# ---- QKV row order -----------------------------------------------------------------------------------------
def test_qkv_permutation_hand_checked() -> None:
    # 2 heads of 2 dims. Contiguous rows: q0 q0 q1 q1 k0 k0 k1 k1 v0 v0 v1 v1 (head h, dim d).
    names = ["q0a", "q0b", "q1a", "q1b", "k0a", "k0b", "k1a", "k1b", "v0a", "v0b", "v1a", "v1b"]
    index = qkv_row_permutation(2, 2, "contiguous", "interleaved")
    assert [names[i] for i in index] == ["q0a", "q0b", "k0a", "k0b", "v0a", "v0b",
                                         "q1a", "q1b", "k1a", "k1b", "v1a", "v1b"]
    # interleaved row h*3*hd + s*hd + d <-> contiguous row s*H*hd + h*hd + d
    assert qkv_row_permutation(2, 1, "contiguous", "interleaved").tolist() == [0, 2, 4, 1, 3, 5]
    assert qkv_row_permutation(2, 1, "interleaved", "contiguous").tolist() == [0, 3, 1, 4, 2, 5]
    assert qkv_row_permutation(3, 4, "interleaved", "interleaved").tolist() == list(range(36))


@pytest.mark.parametrize(("heads", "head_dim"), [(1, 4), (4, 16), (32, 128)])
def test_qkv_permutation_round_trip(heads: int, head_dim: int) -> None:
    weight = torch.randn(3 * heads * head_dim, 5)
    bias = torch.randn(3 * heads * head_dim)
    for tensor in (weight, bias):
        there = convert_qkv_layout(tensor, heads, "contiguous", "interleaved")
        assert torch.equal(convert_qkv_layout(there, heads, "interleaved", "contiguous"), tensor)
    for first in ("contiguous", "interleaved"):
        other = "interleaved" if first == "contiguous" else "contiguous"
        forward = qkv_row_permutation(heads, head_dim, first, other)
        backward = qkv_row_permutation(heads, head_dim, other, first)
        assert torch.equal(forward[backward], torch.arange(3 * heads * head_dim))


def test_qkv_permutation_matches_both_attention_codes() -> None:
    """sat >= 0.4.1 splits the projection in thirds, then heads; ours (= HF) splits heads, then thirds."""
    heads, head_dim, hidden = 4, 8, 32
    contiguous = torch.randn(3 * hidden, hidden)
    x = torch.randn(7, hidden)
    q, k, v = (x @ contiguous.T).split(hidden, dim=-1)  # sat: thirds first
    sat = [t.view(7, heads, head_dim) for t in (q, k, v)]
    interleaved = convert_qkv_layout(contiguous, heads, "contiguous", "interleaved")
    ours = (x @ interleaved.T).view(7, heads, 3 * head_dim).split(head_dim, dim=-1)  # ours: heads first
    for a, b in zip(sat, ours, strict=True):
        assert torch.equal(a, b)


def test_qkv_layout_must_be_known() -> None:
    with pytest.raises(ValueError, match="'contiguous' or 'interleaved'"):
        qkv_row_permutation(2, 2, "contiguous", "qkv")


# ---- model-parallel split / merge -------------------------------------------------------------------------
def test_split_rules_are_data() -> None:
    assert split_kind("transformer.layers.3.attention.query_key_value.weight") == ("column", 3)
    assert split_kind("mixins.eva.model.vit.transformer.layers.0.attention.query_key_value.bias") == ("column", 3)
    assert split_kind("mixins.eva.model.qformer.transformer.layers.0.cross_attention.key_value.weight") == (
        "column", 2)
    assert split_kind("mixins.eva.model.qformer.transformer.layers.0.cross_attention.query.weight") == ("column", 1)
    assert split_kind("mixins.eva.model.qformer.transformer.layers.0.cross_attention.dense.weight") == ("row", 1)
    assert split_kind("transformer.layers.0.attention.dense.bias") == ("same", 1)
    assert split_kind("transformer.layers.0.mlp.dense_4h_to_h.weight") == ("row", 1)
    assert split_kind("mixins.chatglm-final.lm_head.weight") == ("column", 1)
    assert split_kind("transformer.word_embeddings.weight") == ("vocab", 1)
    assert split_kind("transformer.layers.0.input_layernorm.weight") == ("replicated", 1)
    assert split_kind("mixins.eva.model.glm_proj.weight") == ("replicated", 1)


def test_strided_merge_hand_checked() -> None:
    # Full qkv rows [Q0 Q1 | K0 K1 | V0 V1]; rank r stores [Q_r | K_r | V_r].
    full = torch.tensor([10, 11, 20, 21, 30, 31])
    key = "transformer.layers.0.attention.query_key_value.bias"
    pieces = split_model_parallel(key, full, 2)
    assert [p.tolist() for p in pieces] == [[10, 20, 30], [11, 21, 31]]
    assert torch.equal(merge_model_parallel(key, pieces), full)


@pytest.mark.parametrize("key", ["transformer.layers.0.attention.query_key_value.weight",
                                 "x.cross_attention.key_value.weight", "transformer.layers.0.mlp.dense_h_to_4h.weight",
                                 "transformer.layers.0.mlp.dense_4h_to_h.weight", "transformer.word_embeddings.weight",
                                 "transformer.layers.0.attention.dense.bias", "transformer.final_layernorm.weight"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_split_then_merge_is_identity(key: str, ranks: int) -> None:
    full = torch.randn(1200, 24) if key.endswith("weight") and "layernorm" not in key else torch.randn(1200)
    pieces = split_model_parallel(key, full, ranks)
    assert len(pieces) == ranks
    assert torch.equal(merge_model_parallel(key, pieces, tuple(full.shape)), full)


def test_rank_files_hold_the_pieces(tmp_path: Path, visual: torch.nn.Module) -> None:
    directory = save_sat(visual, tmp_path / "sat", mp_size=2)
    config = visual.config
    for rank in range(2):
        state = torch.load(_rank(directory, rank), weights_only=True)["module"]
        h = config.hidden_size
        assert state["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * h // 2, h)
        assert state["transformer.layers.0.attention.dense.weight"].shape == (h, h // 2)
        assert state["transformer.layers.0.attention.dense.bias"].shape == (h,)
        assert state["transformer.word_embeddings.weight"].shape == (config.vocab_size // 2, h)  # >= 1000
        assert state["mixins.chatglm-final.lm_head.weight"].shape == (config.vocab_size // 2, h)
        vit = "mixins.eva.model.vit.transformer."
        assert state[vit + "word_embeddings.weight"].shape == (1, config.eva_config.hidden_size)  # < 1000
        assert state[vit + "layers.1.mlp.dense_h_to_4h.weight"].shape[0] == config.eva_config.inner_hidden_size // 2
        kv = state["mixins.eva.model.qformer.transformer.layers.0.cross_attention.key_value.weight"]
        assert kv.shape == (config.qformer_config.hidden_size, config.qformer_config.cross_attn_hidden_size)
        assert "mixins.chatglm-attn.rotary_emb.inv_freq" in state


# ---- loading round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("mp_size", [1, 2])
def test_chatglm_round_trip(tmp_path: Path, chatglm: torch.nn.Module, mp_size: int, layout: str) -> None:
    directory = save_sat(chatglm, tmp_path / "sat", mp_size=mp_size, qkv_layout=layout)
    model = visualglm.load(directory, progress=False)  # dispatches to load_sat; layout recorded by save_sat
    assert torch.equal(_logits(model), _logits(chatglm))
    assert model.config == chatglm.config and model.checkpoint_dir == directory
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("mp_size", [1, 2])
def test_visualglm_round_trip(tmp_path: Path, visual: torch.nn.Module, mp_size: int, layout: str) -> None:
    directory = save_sat(visual, tmp_path / "sat", mp_size=mp_size, qkv_layout=layout)
    _edit_config(directory, qkv_layout=None)  # as sat writes it: the layout must come from the flag
    model = load_sat(directory, qkv_layout=layout, progress=False)
    assert torch.equal(_logits(model), _logits(visual))
    assert torch.equal(_image_embeds(model), _image_embeds(visual))
    assert model.config == visual.config


def test_wrong_layout_loads_but_gives_other_logits(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    """Why auto must not guess: the other layout loads without any error and is silently wrong."""
    directory = save_sat(chatglm, tmp_path / "sat", qkv_layout="contiguous")
    wrong = load_sat(directory, qkv_layout="interleaved", progress=False)
    assert not torch.allclose(_logits(wrong), _logits(chatglm), atol=1e-3)


def test_separate_lm_head_is_tied_only_when_equal(tmp_path: Path) -> None:
    tied = _model("chatglm", tie=True)
    model = load_sat(save_sat(tied, tmp_path / "tied"), progress=False)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.transformer.word_embeddings.weight
    untied = _model("chatglm", tie=False)
    model = load_sat(save_sat(untied, tmp_path / "untied"), progress=False)
    assert not model.config.tie_word_embeddings
    assert torch.equal(_logits(model), _logits(untied))


def test_dtypes(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "fp16", dtype=torch.float16)
    assert load_sat(directory, progress=False).config.torch_dtype == "float16"
    assert {p.dtype for p in load_sat(directory, progress=False).parameters()} == {torch.bfloat16}  # CPU default
    assert {p.dtype for p in load_sat(directory, dtype="stored", progress=False).parameters()} == {torch.float16}
    model = load_sat(directory, dtype="float32", progress=False)
    assert (_logits(model) - _logits(chatglm.half().float())).abs().max() < 1e-4


# ---- auto QKV layout -------------------------------------------------------------------------------------------
def test_auto_layout_decides_only_what_the_checkpoint_shows(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "one", qkv_layout="interleaved")
    assert detect_qkv_layout(directory)[0] == "interleaved"  # recorded by save_sat
    _edit_config(directory, qkv_layout=None)  # what a sat-written interleaved checkpoint looks like
    with pytest.raises(CheckpointError, match=r"cannot tell the QKV row order.*--qkv-layout"):
        visualglm.load(directory, progress=False)
    assert torch.equal(_logits(visualglm.load(directory, qkv_layout="interleaved", progress=False)),
                       _logits(chatglm))

    directory = save_sat(chatglm, tmp_path / "new", qkv_layout="contiguous")
    _edit_config(directory, qkv_layout=None)
    assert detect_qkv_layout(directory) == ("contiguous",
                                            "model_config.json has pad_token_id (written by sat >= 0.4.1)")
    _edit_config(directory, pad_token_id=None)
    with pytest.raises(CheckpointError, match="cannot tell"):
        detect_qkv_layout(directory)

    directory = save_sat(chatglm, tmp_path / "mp", mp_size=2, qkv_layout="contiguous")
    _edit_config(directory, qkv_layout=None, pad_token_id=None)
    assert detect_qkv_layout(directory)[0] == "contiguous"
    assert torch.equal(_logits(visualglm.load(directory, progress=False)), _logits(chatglm))


def test_unknown_qkv_layout_value(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    with pytest.raises(ValueError, match="qkv_layout must be one of auto, contiguous, interleaved; got 'qkv'"):
        visualglm.load(directory, qkv_layout="qkv")


def test_qkv_layout_is_refused_for_hf_checkpoints(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="applies to sat checkpoints only"):
        visualglm.load(tiny_checkpoint, qkv_layout="contiguous")


# ---- model_config.json mapping ---------------------------------------------------------------------------------
# VisualGLM-6B's model_config.json as published in THUDM/VisualGLM-6B (sat argument names).
VISUALGLM_6B_SAT_CONFIG = {
    "model_class": "VisualGLMModel", "tokenizer_type": "THUDM/chatglm-6b", "num_layers": 28, "hidden_size": 4096,
    "num_attention_heads": 32, "vocab_size": 130528, "layernorm_order": "post", "model_parallel_size": 1,
    "max_sequence_length": 2048, "pre_seq_len": 128, "bos_token_id": 130004, "mask_token_id": 130000,
    "gmask_token_id": 130001, "image_size": [224, 224], "pre_len": 1, "post_len": 0, "in_channels": 3,
    "patch_size": 14, "image_length": 32,
    "eva_args": {"num_layers": 39, "hidden_size": 1408, "num_attention_heads": 16, "vocab_size": 1,
                 "layernorm_order": "pre", "model_parallel_size": 1, "max_sequence_length": 257,
                 "inner_hidden_size": 6144, "use_final_layernorm": False, "layernorm_epsilon": 1e-06,
                 "image_size": [224, 224], "pre_len": 1, "post_len": 0, "in_channels": 3, "num_classes": 0,
                 "patch_size": 14},
    "qformer_args": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "vocab_size": 32,
                     "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
                     "is_decoder": [True, False] * 6, "cross_attn_hidden_size": 1408, "layernorm_epsilon": 1e-12},
}
# What sat's examples/chatglm/transform_param.py records for ChatGLM-6B.
CHATGLM_6B_SAT_CONFIG = {
    "model_class": "ChatGLMModel", "tokenizer_type": "THUDM/chatglm-6b", "num_layers": 28, "hidden_size": 4096,
    "num_attention_heads": 32, "vocab_size": 130528, "layernorm_order": "post", "model_parallel_size": 1,
    "max_sequence_length": 2048, "bos_token_id": 130004, "mask_token_id": 130000, "gmask_token_id": 130001,
}


@pytest.mark.parametrize(("data", "name"), [(VISUALGLM_6B_SAT_CONFIG, "visualglm-6b"),
                                            (CHATGLM_6B_SAT_CONFIG, "chatglm-6b")])
def test_released_model_configs_map_to_the_released_architecture(data: dict, name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every field of the released files is understood
        config = config_from_sat(data, torch_dtype="float16")
    expected = get_config(name)
    expected.tie_word_embeddings = False  # sat keeps a separate lm_head (tied on load when equal)
    assert config == expected
    if name == "visualglm-6b":
        assert config.eva_config.max_sequence_length == 257 and config.qformer_config.ffn_size == 3072
        assert config.pre_seq_len is None  # sat's P-tuning argument, not a prefix in these weights


def test_hf_field_names_are_accepted() -> None:
    from visualglm.config import config_to_dict

    hf = config_to_dict(get_config("visualglm-tiny"))  # eva_config / qformer_config, eos, torch_dtype ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_sat(hf) == get_config("visualglm-tiny")
    with pytest.raises(CheckpointError, match="quantization_bit=4 is not supported"):
        config_from_sat({**hf, "quantization_bit": 4})


def test_missing_essential_field_is_named(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    _edit_config(directory, hidden_size=None)
    with pytest.raises(CheckpointError, match="model_config.json has no 'hidden_size'"):
        visualglm.load(directory, progress=False)
    with pytest.raises(CheckpointError, match="eva_args has no 'num_attention_heads'"):
        config_from_sat({**VISUALGLM_6B_SAT_CONFIG,
                         "eva_args": {"num_layers": 2, "hidden_size": 32}})
    with pytest.raises(CheckpointError, match="has no 'eva_args'"):
        config_from_sat({k: v for k, v in VISUALGLM_6B_SAT_CONFIG.items() if k != "eva_args"})


def test_missing_eos_is_named_when_the_default_does_not_fit(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    _edit_config(directory, eos_token_id=None)  # sat never writes it; 130005 is outside the tiny vocab
    with pytest.raises(CheckpointError, match="no 'eos_token_id'.*add \"eos_token_id\""):
        visualglm.load(directory, progress=False)


def test_unknown_fields(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    _edit_config(directory, model_class="GLM130BModel")
    with pytest.raises(CheckpointError, match="model_class 'GLM130BModel' is not supported"):
        visualglm.load(directory, progress=False)
    _edit_config(directory, model_class="ChatGLMModel", num_experts=8)
    with pytest.raises(CheckpointError, match="num_experts=8 is not supported"):
        visualglm.load(directory, progress=False)
    _edit_config(directory, num_experts=None, lr_note="bookkeeping we do not know")
    with pytest.warns(UserWarning, match="ignoring unknown field.*lr_note"):
        model = visualglm.load(directory, progress=False)
    assert torch.equal(_logits(model), _logits(chatglm))


# ---- directory errors -------------------------------------------------------------------------------------------
def test_missing_latest(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    (directory / "latest").unlink()
    with pytest.raises(CheckpointError, match="has model_config.json but no 'latest' file"):
        visualglm.load(directory, progress=False)


def test_latest_names_a_missing_iteration(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    (directory / "latest").write_text("300\n")
    with pytest.raises(CheckpointError, match="names iteration '300'"):
        visualglm.load(directory, progress=False)
    (directory / "latest").write_text("final")
    with pytest.raises(CheckpointError, match="must hold an iteration number or 'release'"):
        visualglm.load(directory, progress=False)


def test_release_tag_and_iteration_number(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat", iteration=300)
    assert (directory / "latest").read_text() == "300" and _rank(directory).parent.with_name("300").is_dir()
    (directory / "300").rename(directory / "release")
    (directory / "latest").write_text("release")
    assert torch.equal(_logits(visualglm.load(directory, progress=False)), _logits(chatglm))


def test_missing_rank_file(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat", mp_size=2)
    _rank(directory, 1).unlink()
    with pytest.raises(CheckpointError, match=r"missing model-parallel rank file\(s\) mp_rank_01_model_states.pt"):
        visualglm.load(directory, progress=False)


def test_more_rank_files_than_declared(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat", mp_size=2)
    _edit_config(directory, model_parallel_size=1)
    with pytest.raises(CheckpointError, match="2 rank files but model_config.json says model_parallel_size 1"):
        visualglm.load(directory, progress=False)


def _rewrite_rank(path: Path, edit) -> None:
    saved = torch.load(path, weights_only=True)
    edit(saved["module"])
    torch.save(saved, path)


def test_ranks_with_different_keys(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat", mp_size=2)
    _rewrite_rank(_rank(directory, 1), lambda state: state.pop("transformer.final_layernorm.bias"))
    with pytest.raises(CheckpointError, match="mp_rank_01.*lacks transformer.final_layernorm.bias.*inconsistent"):
        visualglm.load(directory, progress=False)


def test_ranks_with_different_row_parallel_bias(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat", mp_size=2)
    key = "transformer.layers.1.mlp.dense_4h_to_h.bias"
    _rewrite_rank(_rank(directory, 1), lambda state: state[key].add_(1.0))
    with pytest.raises(CheckpointError, match=f"{key} differs between rank 0 and rank 1"):
        visualglm.load(directory, progress=False)


def test_ranks_with_different_shapes(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat", mp_size=2)
    key = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    _rewrite_rank(_rank(directory, 1), lambda state: state.__setitem__(key, state[key][:-1].clone()))
    with pytest.raises(CheckpointError, match=f"{key} has different shapes on the model-parallel ranks"):
        visualglm.load(directory, progress=False)


def test_merged_shape_is_checked_against_the_config(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat", mp_size=2)
    _edit_config(directory, inner_hidden_size=128)
    with pytest.raises(CheckpointError, match=r"mp_rank_00\.\.01_model_states.pt: transformer.layers.0.mlp"):
        visualglm.load(directory, progress=False)


def test_unexpected_weights_are_listed(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    _rewrite_rank(_rank(directory), lambda state: state.__setitem__(
        "mixins.lora.layers.0.lora_A.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="unexpected 1 key.*mixins.lora.layers.0.lora_A.weight"):
        visualglm.load(directory, progress=False)


def test_rank_file_without_module(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    torch.save({"weights": {}}, _rank(directory))
    with pytest.raises(CheckpointError, match=r"expected torch.save\(\{'module': state_dict\}\)"):
        visualglm.load(directory, progress=False)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path: Path, chatglm: torch.nn.Module, capsys) -> None:
    directory = save_sat(chatglm, tmp_path / "sat")
    torch.save({"module": {"transformer.word_embeddings.weight": _Exploit()}}, _rank(directory))
    with pytest.raises(CheckpointError, match="refusing to load"):
        visualglm.load(directory, progress=False)
    assert "this must never run" not in capsys.readouterr().out


def test_save_sat_refuses_bad_requests(tmp_path: Path, chatglm: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="do not split into 3 ranks"):
        save_sat(chatglm, tmp_path / "a", mp_size=3)
    with pytest.raises(ValueError, match="'contiguous' or 'interleaved'"):
        save_sat(chatglm, tmp_path / "a", qkv_layout="auto")
    directory = save_sat(chatglm, tmp_path / "b")
    with pytest.raises(FileExistsError, match="not empty"):
        save_sat(chatglm, directory)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"
    shutil.rmtree(directory)


# ---- key maps ----------------------------------------------------------------------------------------------------
def test_sat_keymaps() -> None:
    assert family_spec("chatglm").keymap("sat") is CHATGLM_SAT
    assert family_spec("visualglm").keymap("sat") is VISUALGLM_SAT
    assert map_key("mixins.chatglm-final.lm_head.weight", CHATGLM_SAT) == "lm_head.weight"
    assert map_key("mixins.chatglm-attn.rotary_emb.inv_freq", CHATGLM_SAT) is None
    assert map_key("transformer.position_embeddings.weight", VISUALGLM_SAT) is None
    assert map_key("mixins.eva.model.vit.transformer.layers.3.attention.query_key_value.weight", VISUALGLM_SAT) == (
        "image_encoder.vit.transformer.layers.3.attention.query_key_value.weight")
    assert map_key("mixins.eva.model.vit.transformer.position_embeddings.weight", VISUALGLM_SAT) == (
        "image_encoder.vit.transformer.position_embeddings.weight")
    assert map_key("mixins.eva.model.glm_proj.bias", VISUALGLM_SAT) == "image_encoder.glm_proj.bias"


def test_every_key_template_has_at_most_one_index() -> None:
    """map_key substitutes one layer index per key; no source key may need two."""
    for keymap in (m for spec in FAMILIES.values() for m in spec.keymaps.values()):
        for source, target in keymap.items():
            assert source.count("{}") <= 1 and (target is None or target.count("{}") == source.count("{}"))
