"""Every model class implements the interface the engine, chat, serving, peft and the loader rely on."""

from __future__ import annotations

import pytest
import torch

from visualglm.checkpoint.load import build_model
from visualglm.config import get_config
from visualglm.models.interface import Decoder, MultimodalDecoder, is_multimodal
from visualglm.models.layers import splice_image_embeddings


@pytest.mark.parametrize(("name", "multimodal"), [("chatglm-tiny", False), ("visualglm-tiny", True),
                                                  ("glm-4v-tiny", True)])
def test_models_implement_the_protocols(name: str, multimodal: bool) -> None:
    model = build_model(get_config(name))
    assert isinstance(model, Decoder)
    assert is_multimodal(model) is multimodal
    assert isinstance(model, MultimodalDecoder) is multimodal


def test_a_module_without_the_interface_is_neither() -> None:
    assert not isinstance(torch.nn.Linear(2, 2), Decoder)
    assert not is_multimodal(torch.nn.Linear(2, 2))


def test_splice_replaces_each_rows_span_and_leaves_the_input_alone() -> None:
    embeds = torch.zeros(2, 6, 3)
    images = torch.ones(2, 2, 3) * torch.tensor([1.0, 2.0]).view(2, 1, 1)
    out = splice_image_embeddings(embeds, images, [1, None])
    assert torch.equal(out[0, 1:3], images[0]) and out[0, [0, 3, 4, 5]].abs().sum() == 0
    assert out[1].abs().sum() == 0  # a text-only row
    assert embeds.abs().sum() == 0  # not written in place
    assert splice_image_embeddings(embeds, None, [1, None]) is embeds


@pytest.mark.parametrize("start", [-1, 5])
def test_splice_refuses_a_span_that_does_not_fit(start: int) -> None:
    with pytest.raises(ValueError, match="does not fit a prompt of 6 tokens"):
        splice_image_embeddings(torch.zeros(1, 6, 3), torch.ones(1, 2, 3), [start])
