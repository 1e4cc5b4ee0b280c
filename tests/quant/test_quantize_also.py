"""Optional parts quantized on request: the image encoder ("vision") and GLM-4V-9B's output layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visualglm
from visualglm.checkpoint.load import apply_quantization
from visualglm.checkpoint.quantize_checkpoint import quantize_checkpoint
from visualglm.families import family_spec
from visualglm.quant.linear import Int4Linear, Int8Linear, quantized_bits

from ..conftest import GOLDEN_DIR

QUANTIZED = (Int8Linear, Int4Linear)


def _quantized_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if quantized_bits(module)]


def test_quant_skip_drops_only_the_parts_asked_for() -> None:
    assert family_spec("visualglm").quant_skip_patterns() == family_spec("visualglm").quant_skip
    assert family_spec("visualglm").quant_skip_patterns(("vision",)) == ("lm_head",)
    assert family_spec("glm4v").quant_skip_patterns(("vision", "output")) == ()
    # tied: an INT8 copy, the plan is unchanged
    assert family_spec("chatglm").quant_skip_patterns(("output",)) == ("lm_head",)
    with pytest.raises(ValueError, match="cannot also quantize 'vision' in a chatglm model.*offered: output"):
        family_spec("chatglm").quant_skip_patterns(("vision",))
    with pytest.raises(ValueError, match="offered: output, vision"):
        family_spec("visualglm").quant_skip_patterns(("vision", "embeddings"))


@pytest.mark.parametrize("bits", [8, 4])
def test_vision_quantized_while_loading_equals_load_then_quantize(tiny_visual_checkpoint: Path, bits: int) -> None:
    model = visualglm.load(tiny_visual_checkpoint, quantize=bits, quantize_also=("vision",), progress=False,
                           fast_cpu_kernels=False)
    reference = visualglm.load(tiny_visual_checkpoint, progress=False, fast_cpu_kernels=False)
    apply_quantization(reference, bits, also=("vision",))
    names = _quantized_names(model)
    assert names == _quantized_names(reference)
    assert any(n.startswith("image_encoder.vit.") for n in names)
    assert any(n.startswith("image_encoder.qformer.") for n in names)
    assert "image_encoder.glm_proj" in names and "lm_head" not in names
    state, ref_state = model.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(ref_state)
    for key, value in state.items():
        assert value.dtype == ref_state[key].dtype and torch.equal(value, ref_state[key]), key


def test_quantized_vision_tower_stays_close_and_answers(tiny_visual_checkpoint: Path) -> None:
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    float_model = visualglm.load(tiny_visual_checkpoint, dtype="float32", progress=False)
    int8 = visualglm.load(tiny_visual_checkpoint, dtype="float32", quantize=8, quantize_also=("vision",),
                          progress=False)
    with torch.no_grad():
        want, got = float_model.encode_images(pixels), int8.encode_images(pixels)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert ((got - want).norm() / want.norm()).item() < 0.1  # int8 rows: ~1% error per layer


def test_quantized_checkpoint_keeps_the_vision_plan(tiny_visual_checkpoint: Path, tmp_path: Path) -> None:
    result = quantize_checkpoint(tiny_visual_checkpoint, tmp_path / "q", 4, also=("vision",), progress=False)
    loaded = visualglm.load(result.directory, progress=False)
    assert loaded.quantization["skip"] == ["lm_head"]
    assert any(n.startswith("image_encoder.") for n in _quantized_names(loaded))
    direct = visualglm.load(tiny_visual_checkpoint, quantize=4, quantize_also=("vision",), progress=False)
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(pixels), direct.encode_images(pixels))


@pytest.mark.skipif(not (GOLDEN_DIR / "glm-4v-9b").is_dir(), reason="no GLM-4V-9B golden folder")
def test_glm4v_vision_and_output_layer() -> None:
    model = visualglm.load(GOLDEN_DIR / "glm-4v-9b", dtype="float32", quantize=8, quantize_also=("vision", "output"),
                           progress=False)
    names = _quantized_names(model)
    assert "transformer.output_layer" in names
    assert any(n.startswith("transformer.vision.") for n in names)
    plain = visualglm.load(GOLDEN_DIR / "glm-4v-9b", dtype="float32", quantize=8, progress=False)
    assert not any(n.startswith("transformer.vision.") or n == "transformer.output_layer"
                   for n in _quantized_names(plain))


def test_cli_needs_quant_for_the_optional_parts() -> None:
    run = subprocess.run([sys.executable, "-m", "visualglm", "ask", "--quant-vision", "hello"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "--quantize-vision / --quantize-output need --quantize 8 or --quantize 4" in run.stderr
    assert "Traceback" not in run.stderr
