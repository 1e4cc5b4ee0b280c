"""The compiled decode step: batch-size buckets, one step shared per model, and one graph (no breaks)."""

from __future__ import annotations

import pytest
import torch

from visualglm.bench import random_model
from visualglm.generation.continuous import ContinuousEngine, EngineRequest, decode_bucket
from visualglm.generation.engine import GenerationParams, compile_decode, compiled_decode_for, generate_steps


@pytest.fixture(scope="module")
def model():
    return random_model("chatglm-tiny", torch.float32)


def _prompt(model, body):
    return list(body) + [model.config.gmask_token_id, model.config.bos_token_id]


def test_decode_bucket_rounds_up_to_a_power_of_two_within_the_slots() -> None:
    assert [decode_bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert decode_bucket(5, 6) == 6 and decode_bucket(3, 3) == 3
    with pytest.raises(ValueError, match="rows must be in 1..4"):
        decode_bucket(5, 4)


class _Recording:
    """Stands in for a compiled forward: runs the model and records the rows and mask width of each call."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []

    def __call__(self, *args, **kwargs):
        self.calls.append((kwargs["cache_rows"].stop, args[2].shape[-1]))
        return self.model(*args, **kwargs)


def _run(engine, requests):
    out = {r.id: [] for r in requests}
    for request in requests:
        engine.submit(request)
    while engine.has_work():
        for event in engine.step():
            if event.token is not None:
                out[event.id].append(event.token)
    return out


def test_static_decode_runs_bucketed_rows_over_the_whole_context(model) -> None:
    requests = [EngineRequest(id=i, ids=_prompt(model, range(100 + i, 105 + 2 * i)),
                              params=GenerationParams(max_new_tokens=3 + i)) for i in range(3)]
    recording = _Recording(model)
    static = _run(ContinuousEngine(model, max_rows=8, context=48, compiled=recording), requests)
    eager = _run(ContinuousEngine(model, max_rows=8, context=48), requests)
    assert static == eager
    rows = {r for r, _ in recording.calls}
    assert rows <= {1, 2, 4} and 4 in rows  # three rows in use run as a bucket of 4, never all 8 slots
    assert {width for _, width in recording.calls} == {48}


def test_one_compiled_step_per_model(model) -> None:
    other = random_model("chatglm-tiny", torch.float32)
    first = compile_decode(model)
    assert compile_decode(model) is first and compiled_decode_for(model) is first
    assert compiled_decode_for(other) is None
    assert first not in list(model.modules()) and not any("compiled" in k for k in model.state_dict())


def test_the_server_engine_uses_the_models_compiled_step(model) -> None:
    from visualglm.serving.worker import make_engine

    compiled = compile_decode(model)
    engine = make_engine(model, (2, 32, 64))
    assert engine.compiled is compiled
    engine.close()


def test_decode_forward_traces_as_one_graph(model) -> None:
    # fullgraph=True (what CUDA graphs need) fails on any graph break in the model's decode forward; the
    # aot_eager backend checks the trace without compiling kernels.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    prompts = [_prompt(model, [100, 101, 102]), _prompt(model, [103, 104])]
    params = GenerationParams(max_new_tokens=4)
    got = [s.tokens.tolist() for s in generate_steps(model, prompts, params=params, compiled=compiled)]
    want = [s.tokens.tolist() for s in generate_steps(model, prompts, params=params)]
    assert got == want


def test_a_bf16_model_on_the_cpu_kernels_decodes_compiled_as_eager() -> None:
    """The load-time CPU kernels (oneDNN's reordered bf16 linear where the CPU has AVX-512 BF16, the compiled
    attention where built) inside a torch.compile'd decode step: Inductor once failed to lower the reordered
    linear ("LoweringException"), which broke ``visualglm bench --compile``."""
    model = random_model("chatglm-tiny", torch.bfloat16)
    requests = [EngineRequest(id=i, ids=_prompt(model, range(100 + i, 105 + 2 * i)),
                              params=GenerationParams(max_new_tokens=4 + i)) for i in range(3)]
    compiled = _run(ContinuousEngine(model, max_rows=4, context=32, compiled=compile_decode(model)), requests)
    assert compiled == _run(ContinuousEngine(model, max_rows=4, context=32), requests)
