"""P-tuning v2 prefixes through the generic extra_kv hook of the ChatGLM attention."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_chatglm
from visualglm.peft import apply_adapter, inject_ptuning, prefix_encoder, remove_ptuning, save_adapter

IDS = torch.tensor([[5, 6, 7, 8, 1001, 1004, 9, 10, 11]])


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_trains_alone_and_round_trips_through_peft_files(tmp_path, projection) -> None:
    model = random_chatglm()
    base = model(IDS)
    encoder = inject_ptuning(model, pre_seq_len=3, prefix_projection=projection)
    model.eval()
    adapted = model(IDS)
    assert (adapted - base).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    model.eval()
    save_adapter(model, tmp_path)
    fresh = apply_adapter(random_chatglm(), tmp_path)
    torch.testing.assert_close(fresh(IDS), adapted, atol=1e-5, rtol=1e-5)
    remove_ptuning(model)
    assert prefix_encoder(model) is None
    torch.testing.assert_close(model(IDS), base)


def test_prefix_is_used_by_cached_decoding() -> None:
    """Prefill + one decode step with the KV cache gives the logits of the full forward."""
    model = random_chatglm()
    inject_ptuning(model, pre_seq_len=2)
    model.eval()
    full = model(IDS)
    prompt, last = IDS[:, :-1], IDS[:, -1:]
    positions, mask = model.prompt_inputs(prompt)
    model.setup_kv_cache(1, 16, dtype=torch.float32)
    n = prompt.shape[1]
    with torch.no_grad():
        model(prompt, positions, mask, cache_positions=torch.arange(n))
        step_pos = model.next_position_ids(positions[:, :, -1:])
        out = model(last, step_pos, None, cache_positions=torch.tensor([n]))
    torch.testing.assert_close(out[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)


def test_glm4_has_no_prefix_hook() -> None:
    from visualglm.checkpoint.load import build_model
    from visualglm.config import get_config

    model = build_model(get_config("glm-4v-tiny"), device="cpu")
    with pytest.raises(ValueError, match="LoRA"):
        inject_ptuning(model, 2)
