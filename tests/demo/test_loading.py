"""The one loading function of the CLI and the server (visualglm.demo.loading.load_model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from visualglm.demo import DEMO_MODEL_NAME
from visualglm.demo.loading import LoadedModel, load_model, model_name
from visualglm.models.interface import is_multimodal
from visualglm.quant.linear import quantized_bits
from visualglm.serving.worker import load_model as serving_load_model


def test_the_default_is_the_shipped_demo_model() -> None:
    loaded = load_model(None)
    assert isinstance(loaded, LoadedModel) and loaded.name == DEMO_MODEL_NAME
    model, tokenizer, name = loaded
    assert is_multimodal(model) and not model.training and tokenizer.encode("hello")
    assert name == DEMO_MODEL_NAME


def test_quantize_and_the_server_load_the_same_way(tiny_chat_checkpoint: Path) -> None:
    model, _, name = load_model(tiny_chat_checkpoint, quantize=8, dtype="float32")
    assert name == tiny_chat_checkpoint.name
    # Int8Linear, or its oneDNN/AMX form on CPUs with AMX (the load-time kernel choice)
    assert any(quantized_bits(m) == 8 for m in model.modules())
    served, _, served_name = serving_load_model(tiny_chat_checkpoint, quantize=8, dtype="float32")
    assert served_name == name
    assert sorted(served.state_dict()) == sorted(model.state_dict())


def test_an_adapter_with_tensor_parallelism_is_refused_before_loading(monkeypatch) -> None:
    import visualglm.checkpoint.load as checkpoint_load

    monkeypatch.setattr(checkpoint_load, "load", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(ValueError, match="--adapter does not combine with tensor parallelism"):
        load_model(None, adapter="some/adapter", tensor_parallel=True)


def test_model_name() -> None:
    assert model_name(None) == model_name("") == DEMO_MODEL_NAME
    assert model_name("THUDM/glm-4v-9b") == "glm-4v-9b" and model_name(Path("/ckpt/run1/")) == "run1"
