"""The optional AMX kernels (INT4 and INT8): their layouts, their exactness against the weight-only
definition, the modules' state_dicts and the load-time swap. The kernel tests build the kernels (about a
minute, into a temporary folder) where the CPU has AMX and a compiler; elsewhere they are skipped and
PyTorch's kernels keep running."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from visualglm.kernels import native
from visualglm.kernels.amx_tiles import pack_vnni_tiles, unpack_vnni_tiles
from visualglm.quant.amx_int4 import (
    AmxInt4Linear,
    AmxInt8Linear,
    fits,
    pack_tiles,
    unpack_tiles,
)
from visualglm.quant.linear import Int4Linear, Int8Linear


def test_tile_layout_round_trips_and_puts_four_inputs_of_an_output_side_by_side() -> None:
    codes = torch.randint(0, 16, (32, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_tiles(codes)
    assert packed.shape == (2, 2, 16, 32) and torch.equal(unpack_tiles(packed), codes)
    # tile (0, 0), row j = 1, column 5: output 1 (5 // 4), input 4 * 1 + 5 % 4 = 5, low nibble of byte 5
    assert int(packed[0, 0, 1, 5]) & 15 == int(codes[1, 5])
    # column 37 (byte 5's high nibble): output 9, input 4 + 1
    assert int(packed[0, 0, 1, 5]) >> 4 == int(codes[9, 5])


def test_int8_tile_layout_round_trips() -> None:
    weight = torch.randint(-127, 128, (32, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = pack_vnni_tiles(weight)
    assert packed.shape == (2, 2, 16, 64) and torch.equal(unpack_vnni_tiles(packed), weight)
    assert int(packed[1, 1, 2, 7]) == int(weight[16 + 1, 64 + 8 + 3])  # output 7 // 4, input 4 * 2 + 7 % 4


def test_int8_state_dict_is_int8linear_s() -> None:
    reference = Int8Linear.from_linear(torch.nn.Linear(128, 32))
    module = AmxInt8Linear.from_int8(reference)
    state, want = module.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(want) and all(torch.equal(state[k], want[k]) for k in want)
    fresh = AmxInt8Linear(torch.zeros(32, 128, dtype=torch.int8), torch.ones(32), torch.zeros(32))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.packed, module.packed)


def test_shapes_the_kernel_takes() -> None:
    def int4(out_features: int, in_features: int, group: int) -> Int4Linear:
        return Int4Linear.from_linear(torch.nn.Linear(in_features, out_features), group_size=group)

    assert fits(int4(32, 256, 128)) and fits(int4(48, 128, 64))
    assert not fits(int4(40, 256, 128))  # outputs not a multiple of 16
    assert not fits(int4(32, 256, 32))  # groups of 32 inputs


def test_state_dict_is_the_portable_int4_one_and_loads_back() -> None:
    linear = torch.nn.Linear(256, 48)
    reference = Int4Linear.from_linear(linear, group_size=128)
    module = AmxInt4Linear.from_int4(reference)
    state, want = module.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(want) and all(torch.equal(state[k], want[k]) for k in want)
    torch.testing.assert_close(module.dequantize(), reference.dequantize(), rtol=0, atol=0)
    fresh = AmxInt4Linear(torch.zeros(48, 256, dtype=torch.uint8), torch.zeros(2, 48, 2), 128, torch.zeros(48))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.packed, module.packed) and torch.equal(fresh.bias, module.bias)
    with pytest.raises(RuntimeError, match="qweight"):
        fresh.load_state_dict({**state, "qweight": state["qweight"][:, :64]})


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if not native.cpu_supported():
        pytest.skip("this CPU has no AMX-INT8: the kernel cannot run here")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the kernel")
    folder = Path(tmp_path_factory.mktemp("kernels"))
    patch = pytest.MonkeyPatch()
    patch.setenv(native.ENV_DIR, str(folder))
    native.load.cache_clear()
    try:
        native.build()
        module = native.load()
        assert module is not None
        yield module
    finally:
        patch.undo()
        native.load.cache_clear()


def _exact(x: torch.Tensor, module: Int4Linear) -> torch.Tensor:
    return (x.double() @ module.dequantize().double().t() + module.bias.double()).float()


@pytest.mark.parametrize("rows", [1, 3, 8, 17, 64])
def test_kernel_computes_the_weight_only_result_to_fp32_rounding(kernel, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(256, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=gen) * 0.05)
    reference = Int4Linear.from_linear(linear, group_size=128)
    module = AmxInt4Linear.from_int4(reference)
    x = torch.randn(rows, 256, generator=gen) * torch.linspace(0.01, 3, 256)  # uneven magnitudes per input
    with torch.inference_mode():
        got = module(x)
    want = _exact(x, reference)
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()
    # bf16 activations come out as bf16, equal to the exact result rounded (to a bf16 ulp)
    with torch.inference_mode():
        got16 = module(x.bfloat16().unsqueeze(0))
    assert got16.dtype == torch.bfloat16 and got16.shape == (1, rows, 64)
    want16 = _exact(x.bfloat16().float(), reference)
    assert (got16[0].float() - want16).abs().max() <= 2**-8 * want16.abs().max()


@pytest.mark.parametrize("rows", [1, 8, 50])
def test_int8_kernel_computes_the_weight_only_result_to_fp32_rounding(kernel, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(256, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=gen) * 0.05)
    reference = Int8Linear.from_linear(linear)
    module = AmxInt8Linear.from_int8(reference)
    x = torch.randn(rows, 256, generator=gen) * torch.linspace(0.01, 3, 256)
    with torch.inference_mode():
        got = module(x)
    want = _exact(x, reference)
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()


def test_a_model_loaded_with_the_kernel_answers_as_the_plain_int4_model(kernel, tiny_checkpoint) -> None:
    import visualglm
    from visualglm.checkpoint import cpu_kernels

    cpu_kernels._available.cache_clear()
    try:
        fast = visualglm.load(tiny_checkpoint, dtype="bfloat16", quantize=4, progress=False)
    finally:
        cpu_kernels._available.cache_clear()
    plain = visualglm.load(tiny_checkpoint, dtype="bfloat16", quantize=4, progress=False, fast_cpu_kernels=False)
    swapped = [m for m in fast.modules() if isinstance(m, AmxInt4Linear)]
    assert fast.cpu_kernels.int4 == "amx" and len(swapped) == 4 * fast.config.num_layers
    ids = torch.tensor([[5, 6, 7, 8, fast.config.gmask_token_id, fast.config.bos_token_id]])
    positions, mask = fast.prompt_inputs(ids)
    with torch.inference_mode():
        got, want = fast(ids, positions, mask).float(), plain(ids, positions, mask).float()
    # The plain model multiplies bf16-rounded activations; the kernel the exact ones: bf16 rounding apart.
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert sorted(fast.state_dict()) == sorted(plain.state_dict())
