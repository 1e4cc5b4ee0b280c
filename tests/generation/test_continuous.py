"""The continuous-batching engine: requests arriving at random steps, of every kind, answer as they would
alone; seeded sampling ignores its neighbours; staged prefill is exact; prefixes are reused only where that
is exact; ended and failed rows free their slots."""

from __future__ import annotations

import random

import pytest
import torch

import visualglm
from visualglm.config import image_size
from visualglm.generation.chat import build_prompt_ids
from visualglm.generation.continuous import ContinuousEngine, EngineRequest, kv_bytes_per_token, rows_for_budget
from visualglm.generation.engine import GenerationParams, generate_steps
from visualglm.generation.sampling import SamplingParams
from visualglm.image import preprocess

from ..conftest import random_chatglm

GMASK, SOP = 1001, 1004
GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def text_model():
    return random_chatglm(tie_word_embeddings=False, seed=3)


@pytest.fixture(scope="module")
def visual(tiny_visual_checkpoint):
    return visualglm.load(tiny_visual_checkpoint, progress=False), visualglm.load_tokenizer(tiny_visual_checkpoint)


@pytest.fixture(scope="module")
def glm4v(glm4v_checkpoint):
    return visualglm.load(glm4v_checkpoint, progress=False), visualglm.load_tokenizer(glm4v_checkpoint)


def _alone(model, request: EngineRequest) -> list[int]:
    """The request through the single-batch path, fresh: its answer tokens (stop id excluded)."""
    embeds = None
    if request.image_embeds is not None:
        embeds = model.embed_with_images(torch.tensor([request.ids]), request.image_embeds, [request.image_start])
    generator = None if request.seed is None else torch.Generator().manual_seed(request.seed)
    out = []
    for step in generate_steps(model, [request.ids], params=request.params, generator=generator,
                               inputs_embeds=embeds):
        if bool(step.finished[0]):
            break
        out.append(int(step.tokens[0]))
    return out


def _run(engine: ContinuousEngine, requests: list[EngineRequest], rng: random.Random, end_after: dict | None = None
         ) -> tuple[dict, dict]:
    """Submit the requests one by one at random steps; end some after a number of tokens. Returns each
    request's tokens and final reason."""
    end_after = end_after or {}
    tokens = {r.id: [] for r in requests}
    reasons: dict = {}
    pending = list(requests)
    while pending or engine.has_work():
        while pending and rng.random() < 0.4:
            engine.submit(pending.pop(0))
        for event in engine.step():
            if event.token is not None:
                tokens[event.id].append(event.token)
            if event.reason is not None:
                reasons[event.id] = event.reason
        for key, count in end_after.items():
            if key not in reasons and len(tokens[key]) >= count:
                engine.end(key)
    return tokens, reasons


def _text_requests(count: int, rng: random.Random) -> list[EngineRequest]:
    return [EngineRequest(i, [rng.randrange(10, 900) for _ in range(rng.randrange(1, 40))] + [GMASK, SOP],
                          GenerationParams(max_new_tokens=rng.randrange(1, 14), sampling=GREEDY))
            for i in range(count)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_requests_arriving_at_random_steps_answer_as_alone(text_model, seed: int) -> None:
    rng = random.Random(seed)
    requests = _text_requests(14, rng)
    engine = ContinuousEngine(text_model, max_rows=4, context=96, prefill_chunk=10)
    cancelled = {3: 2, 7: 0}  # ended after 2 tokens, and at once
    tokens, reasons = _run(engine, requests, rng, end_after=cancelled)
    for request in requests:
        want = _alone(text_model, request)
        if request.id in cancelled:
            assert reasons[request.id] == "ended" or len(want) <= cancelled[request.id]
            assert tokens[request.id] == want[:len(tokens[request.id])]
        else:
            assert tokens[request.id] == want, request.id
            assert reasons[request.id] == ("length" if len(want) == request.params.max_new_tokens else "stop")
    assert engine.stats.largest_batch >= 3 and not engine.has_work() and engine.running == 0
    assert engine.stats.joined_steps > 0  # prefill stages ran inside decode forwards too
    assert engine.stats.short_first > 0  # and short prompts went ahead of long ones


def test_seeded_sampling_ignores_what_runs_beside_it(text_model) -> None:
    rng = random.Random(5)
    sampled = SamplingParams(temperature=0.9, top_k=40, top_p=0.9)
    requests = [EngineRequest(i, r.ids, GenerationParams(max_new_tokens=10, sampling=sampled), seed=100 + i)
                for i, r in enumerate(_text_requests(6, rng))]
    tokens, _ = _run(ContinuousEngine(text_model, max_rows=3, context=96), requests, rng)
    for request in requests:
        assert tokens[request.id] == _alone(text_model, request)


def test_rows_sharing_a_repetition_penalty_are_sampled_as_one_batch_and_answer_as_alone(text_model) -> None:
    # Equal settings, their own seeds: one processed batch per step, each row's penalty from its own tokens.
    rng = random.Random(6)
    sampled = SamplingParams(temperature=0.8, top_p=0.8, repetition_penalty=1.3)
    requests = [EngineRequest(i, r.ids, GenerationParams(max_new_tokens=10, sampling=sampled), seed=7 + i)
                for i, r in enumerate(_text_requests(6, rng))]
    engine = ContinuousEngine(text_model, max_rows=4, context=96)
    tokens, _ = _run(engine, requests, rng)
    assert engine.stats.largest_batch >= 3
    for request in requests:
        assert tokens[request.id] == _alone(text_model, request)


def test_an_error_in_one_row_of_a_sampled_batch_ends_that_row_only(text_model, monkeypatch) -> None:
    from visualglm.generation import continuous
    from visualglm.generation.sampling import SamplingError

    def failing(logits, token_ids, params, generators, valid=None):  # the row seeded 666 has bad scores
        if any(g.initial_seed() == 666 for g in generators):
            raise SamplingError("row 0: NaN scores")
        return next_tokens(logits, token_ids, params, generators, valid)

    next_tokens = continuous.next_tokens
    monkeypatch.setattr(continuous, "next_tokens", failing)
    params = GenerationParams(max_new_tokens=6, sampling=SamplingParams(temperature=0.9))
    ok = EngineRequest("ok", [30, 31, GMASK, SOP], params, seed=1)
    bad = EngineRequest("bad", [40, 41, GMASK, SOP], params, seed=666)
    engine = ContinuousEngine(text_model, max_rows=2, context=96)
    engine.submit(ok)
    events = engine.step()
    engine.submit(bad)
    while engine.has_work():
        events += engine.step()
    assert [e.reason for e in events if e.id == "bad" and e.reason] == ["error"]
    assert [e.token for e in events if e.id == "ok" and e.token is not None] == _alone(text_model, ok)


def test_a_long_prompt_prefilled_in_stages_is_exact_and_lets_the_others_decode(text_model) -> None:
    long = EngineRequest("long", [7 + i % 800 for i in range(60)] + [GMASK, SOP],
                         GenerationParams(max_new_tokens=4, sampling=GREEDY))
    short = EngineRequest("short", [11, 12, GMASK, SOP], GenerationParams(max_new_tokens=12, sampling=GREEDY))
    engine = ContinuousEngine(text_model, max_rows=2, context=96, prefill_chunk=20)
    engine.submit(short)
    engine.step()  # short is running
    engine.submit(long)
    got = {"long": [], "short": []}
    short_tokens_during_prefill = 0
    while engine.has_work():
        before = len(got["long"])
        for event in engine.step():
            if event.token is not None:
                got[event.id].append(event.token)
        if not got["long"] and before == 0:
            short_tokens_during_prefill += 1
    assert got["long"] == _alone(text_model, long)
    assert [t for t in got["short"]] == _alone(text_model, short)[1:]  # its first token came in step one
    # The short row kept getting a token at every step of the long one's staged prefill, which carried about
    # 20 tokens' worth of work per step (pieces of layers: the model has fewer layers than that would take
    # in whole layers), overshooting by a quarter of that at most.
    steps = short_tokens_during_prefill + 1
    assert len(text_model.attention_modules()) < -(-len(long.ids) // 20)
    assert -(-len(long.ids) // 25) <= steps <= -(-len(long.ids) // 20)


def test_images_and_text_of_both_image_families_mix(visual, glm4v) -> None:
    from PIL import Image

    for model, tokenizer in (visual, glm4v):
        size = image_size(model.config)
        rng = random.Random(9)
        requests = []
        for i in range(7):
            with_image = i % 2 == 0
            ids, start = build_prompt_ids(model, tokenizer, f"question number {i} " * (i % 3 + 1), [],
                                          image=with_image)
            embeds = None
            if with_image:
                color = (40 * i % 255, 120, 200)
                with torch.inference_mode():
                    embeds = model.encode_images(preprocess(Image.new("RGB", (32, 24), color), size))
            requests.append(EngineRequest(i, ids, GenerationParams(max_new_tokens=3 + i, sampling=GREEDY),
                                          image_start=start, image_embeds=embeds, image_key=f"img{i}"))
        tokens, _ = _run(ContinuousEngine(model, max_rows=3), requests, rng)
        for request in requests:
            assert tokens[request.id] == _alone(model, request), (model.config.family, request.id)


def test_glm4v_reuses_the_earlier_turns_and_the_same_image(glm4v) -> None:
    from PIL import Image

    model, tokenizer = glm4v
    image = preprocess(Image.new("RGB", (20, 20), (10, 200, 30)), model.config.vision_config.image_size)
    with torch.inference_mode():
        embeds = model.encode_images(image)
    engine = ContinuousEngine(model, max_rows=2)
    first_ids, start = build_prompt_ids(model, tokenizer, "describe it", [], image=True)
    first = EngineRequest("t1", first_ids, GenerationParams(max_new_tokens=6, sampling=GREEDY), image_start=start,
                          image_embeds=embeds, image_key="same")
    answer, _ = _run(engine, [first], random.Random(0))
    text = tokenizer.decode(answer["t1"])
    # The client resends the whole conversation with its new question.
    second_ids, start2 = build_prompt_ids(model, tokenizer, "and the colour?", [("describe it", text)], image=True)
    second = EngineRequest("t2", second_ids, GenerationParams(max_new_tokens=6, sampling=GREEDY), image_start=start2,
                           image_embeds=embeds, image_key="same")
    before = engine.stats.prefill_tokens
    tokens, _ = _run(engine, [second], random.Random(0))
    computed = engine.stats.prefill_tokens - before
    common = next(i for i, (a, b) in enumerate(zip(first_ids + answer["t1"], second_ids, strict=False)) if a != b)
    assert computed == len(second_ids) - min(common, len(first_ids) + len(answer["t1"]) - 1)
    assert computed < len(second_ids) - model.image_tokens  # the image was not encoded into the cache again
    assert tokens["t2"] == _alone(model, second)
    # Another image at the same place: nothing from the image on may be reused.
    other = EngineRequest("t3", second_ids, GenerationParams(max_new_tokens=6, sampling=GREEDY), image_start=start2,
                          image_embeds=embeds * 0.5, image_key="other")
    before = engine.stats.prefill_tokens
    tokens, _ = _run(engine, [other], random.Random(0))
    assert engine.stats.prefill_tokens - before >= len(second_ids) - start2
    assert tokens["t3"] == _alone(model, other)


def test_chatglm_reuses_only_an_identical_context(text_model) -> None:
    engine = ContinuousEngine(text_model, max_rows=1, context=96)
    prompt = [20, 21, 22, 23, GMASK, SOP]
    first = EngineRequest("a", prompt, GenerationParams(max_new_tokens=4, sampling=GREEDY))
    tokens, _ = _run(engine, [first], random.Random(0))
    # A follow-up turn: the history sits in the bidirectional context, so nothing can be reused.
    follow = EngineRequest("b", [20, 21, 22, 23, 24, 25, 26, GMASK, SOP], first.params)
    before = engine.stats.prefill_tokens
    got, _ = _run(engine, [follow], random.Random(0))
    assert engine.stats.prefill_tokens - before == len(follow.ids) and got["b"] == _alone(text_model, follow)
    # The identical prompt again (a regenerate): all but its last token come from the cache.
    again = EngineRequest("c", list(follow.ids), first.params)
    before = engine.stats.prefill_tokens
    got, _ = _run(engine, [again], random.Random(0))
    assert engine.stats.prefill_tokens - before == 1 and got["c"] == _alone(text_model, again)


def test_ended_and_failed_rows_free_their_slots(text_model) -> None:
    vocab = text_model.config.vocab_size
    engine = ContinuousEngine(text_model, max_rows=2, context=96)
    ok = EngineRequest("ok", [30, 31, GMASK, SOP], GenerationParams(max_new_tokens=8, sampling=GREEDY))
    bad = EngineRequest("bad", [40, 41, GMASK, SOP],
                        GenerationParams(max_new_tokens=8, sampling=GREEDY.replace(banned_ranges=((0, vocab),))))
    waiting = EngineRequest("waiting", [50, GMASK, SOP], ok.params)
    for request in (ok, bad, waiting):
        engine.submit(request)
    engine.end("waiting")
    events = engine.step() + engine.step()
    by_id = {event.id: event for event in events if event.reason is not None}
    assert by_id["waiting"].reason == "ended" and by_id["bad"].reason == "error"
    assert "no token left" in str(by_id["bad"].error)
    assert engine.running == 1  # "ok" only: the failed row's slot is free again
    while engine.has_work():
        events += engine.step()
    assert [e.reason for e in events if e.id == "ok" and e.reason] == ["length"] and engine.running == 0


def test_rows_for_a_kv_budget(text_model) -> None:
    per_token = kv_bytes_per_token(text_model)
    config = text_model.config
    heads, dim = text_model.kv_cache_layout()
    assert per_token == 2 * heads * dim * config.num_layers * 4  # float32 keys and values, every layer
    assert rows_for_budget(text_model, 100, 8, None) == 8
    assert rows_for_budget(text_model, 100, 8, 3 * 100 * per_token + 5) == 3
    assert rows_for_budget(text_model, 100, 8, 10) == 1


@pytest.mark.slow
def test_compiled_decode_steps_equal_eager(text_model) -> None:
    from visualglm.generation.engine import compile_decode

    rng = random.Random(4)
    requests = _text_requests(5, rng)
    engine = ContinuousEngine(text_model, max_rows=3, context=96, compiled=compile_decode(text_model))
    tokens, _ = _run(engine, requests, rng)
    for request in requests:
        assert tokens[request.id] == _alone(text_model, request)


def _drain(engine: ContinuousEngine, end_at_step: dict | None = None) -> tuple[dict, dict]:
    tokens: dict = {}
    reasons: dict = {}
    step = 0
    while engine.has_work():
        for key, at in (end_at_step or {}).items():
            if at == step:
                engine.end(key)
        for event in engine.step():
            tokens.setdefault(event.id, [])
            if event.token is not None:
                tokens[event.id].append(event.token)
            if event.reason is not None:
                reasons[event.id] = event.reason
        step += 1
    return tokens, reasons


@pytest.mark.parametrize("chunk", [4, 1000])
def test_newcomers_waiting_together_are_prefilled_as_one_group_and_answer_as_alone(text_model, chunk) -> None:
    rng = random.Random(11)
    requests = _text_requests(6, rng)
    engine = ContinuousEngine(text_model, max_rows=6, context=96, prefill_chunk=chunk)
    for request in requests:
        engine.submit(request)
    first = engine.step()
    tokens, _ = _drain(engine)
    for event in first:
        tokens.setdefault(event.id, [])
        if event.token is not None:
            tokens[event.id].insert(0, event.token)
    for request in requests:
        assert tokens[request.id] == _alone(text_model, request), request.id
    budget = engine.group_tokens(0)
    if sum(len(r.ids) for r in requests) <= budget:  # all in the first group, left-padded to one length
        assert {event.id for event in first} == {r.id for r in requests}


def test_group_budget_follows_the_decode_batch_and_the_chunk(text_model) -> None:
    engine = ContinuousEngine(text_model, max_rows=8, context=96, prefill_chunk=16)
    layers = len(text_model.attention_modules())
    assert engine.group_tokens(0) == 16 * layers
    assert engine.group_tokens(40) == 40 * layers
    # Requests beyond the budget wait for the next group.
    ids = [5] * 30 + [GMASK, SOP]
    for index in range(8):
        engine.submit(EngineRequest(index, ids, GenerationParams(max_new_tokens=2, sampling=GREEDY)))
    first = engine.step()
    assert len(first) == (16 * layers) // len(ids) >= 1 and len(engine.waiting) == 8 - len(first)


@pytest.mark.parametrize("prompt, one_step, whole", [(16, None, True), (17, None, False), (17, 24, True),
                                                    (24, 24, True), (25, 24, False)])
def test_a_group_of_up_to_one_steps_tokens_is_prefilled_in_one_step(text_model, prompt: int, one_step: int | None,
                                                                     whole: bool) -> None:
    # prefill_chunk 8: by default (two shares) 16 new tokens run whole in the step after admission, 17 at 8
    # tokens' worth a step (pieces of layers, which may overshoot a step's share by a quarter); with
    # one_step_tokens 24, up to 24 run whole.
    runner = EngineRequest("runner", [7, 8, GMASK, SOP], GenerationParams(max_new_tokens=40, sampling=GREEDY))
    newcomer = EngineRequest("new", [9 + i for i in range(prompt - 2)] + [GMASK, SOP],
                             GenerationParams(max_new_tokens=2, sampling=GREEDY))
    engine = ContinuousEngine(text_model, max_rows=2, context=96, prefill_chunk=8, one_step_tokens=one_step)
    assert engine.one_step_tokens == (one_step or 16)
    engine.submit(runner)
    engine.step()  # the runner decodes from now on
    engine.submit(newcomer)
    taken, first = 0, []
    while not first:
        taken += 1
        first = [e.token for e in engine.step() if e.id == "new" and e.token is not None]
    if whole:
        assert taken == 1
    else:
        assert -(-prompt // 10) <= taken <= -(-prompt // 8)
    tokens, _ = _drain(engine)
    assert first + tokens["new"] == _alone(text_model, newcomer)


def test_a_row_ended_while_its_group_prefills_leaves_the_others_exact(text_model) -> None:
    rng = random.Random(4)
    long = [EngineRequest(f"long{i}", [rng.randrange(10, 900) for _ in range(60)] + [GMASK, SOP],
                          GenerationParams(max_new_tokens=6, sampling=GREEDY)) for i in range(3)]
    runner = EngineRequest("runner", [7, 8, GMASK, SOP], GenerationParams(max_new_tokens=30, sampling=GREEDY))
    engine = ContinuousEngine(text_model, max_rows=4, context=96, prefill_chunk=8)
    engine.submit(runner)
    engine.step()  # the runner decodes from now on, so the group is prefilled in stages
    for request in long:
        engine.submit(request)
    tokens, reasons = _drain(engine, end_at_step={"long1": 1})
    assert reasons["long1"] == "ended" and tokens.get("long1", []) == []
    for request in (long[0], long[2]):
        assert tokens[request.id] == _alone(text_model, request)
    assert engine.running == 0


def test_text_and_image_requests_prefilled_as_one_group_answer_as_alone(visual, glm4v) -> None:
    """All submitted at once into one group (a text row among image rows comes as its own embeddings)."""
    from PIL import Image

    for model, tokenizer in (visual, glm4v):
        size = image_size(model.config)
        requests = []
        for i, question in enumerate(["hello", "a longer question about the shapes", "why", "the colour?"]):
            with_image = i in (1, 2)
            ids, start = build_prompt_ids(model, tokenizer, question, [], image=with_image)
            embeds = None
            if with_image:
                with torch.inference_mode():
                    embeds = model.encode_images(preprocess(Image.new("RGB", (32, 24), (9, 99 * i, 199)), size))
            requests.append(EngineRequest(i, ids, GenerationParams(max_new_tokens=5, sampling=GREEDY),
                                          image_start=start, image_embeds=embeds, image_key=f"img{i}"))
        engine = ContinuousEngine(model, max_rows=4, prefill_chunk=2000)  # every prompt fits one group
        for request in requests:
            engine.submit(request)
        first = {event.id for event in engine.step()}
        assert first == {0, 1, 2, 3}, first
        tokens, _ = _drain(engine)
        for request in requests:
            assert tokens.get(request.id, []) == _alone(model, request)[1:], (model.config.family, request.id)


def test_early_events_come_before_the_decode_forward_and_change_nothing(text_model) -> None:
    rng = random.Random(11)
    requests = _text_requests(6, rng)
    # A budget of 2 tokens' worth per step: the newcomers' prefills run in pieces of layers, before the decode
    # forward (a prefill of whole layers runs inside it, and its first tokens come with the decode step's).
    engine = ContinuousEngine(text_model, max_rows=3, context=96, prefill_chunk=2)
    tokens = {r.id: [] for r in requests}
    early_firsts = []  # requests whose first token came early
    decode_steps_at_start = 0

    def collect(events) -> None:
        assert engine.stats.decode_steps == decode_steps_at_start  # this step's decode forward has not run
        for event in events:
            if event.token is not None:
                if not tokens[event.id]:
                    early_firsts.append(event.id)
                tokens[event.id].append(event.token)

    pending = list(requests)
    while pending or engine.has_work():
        if pending:
            engine.submit(pending.pop(0))
        decode_steps_at_start = engine.stats.decode_steps
        for event in engine.step(early=collect):
            if event.token is not None:
                tokens[event.id].append(event.token)
    assert len(early_firsts) >= 3  # newcomers that joined running rows got their first token early
    for request in requests:
        assert tokens[request.id] == _alone(text_model, request)


def test_a_long_causal_prompt_is_prefilled_in_token_chunks_inside_decode_steps(glm4v) -> None:
    from PIL import Image

    model, tokenizer = glm4v
    runner_ids, _ = build_prompt_ids(model, tokenizer, "hi", [], image=False)
    runner = EngineRequest("runner", runner_ids, GenerationParams(max_new_tokens=60, sampling=GREEDY))
    image = preprocess(Image.new("RGB", (20, 20), (200, 30, 60)), model.config.vision_config.image_size)
    with torch.inference_mode():
        embeds = model.encode_images(image)
    ids, start = build_prompt_ids(model, tokenizer, "tell me a long story about this " * 3, [], image=True)
    long = EngineRequest("long", ids, GenerationParams(max_new_tokens=5, sampling=GREEDY), image_start=start,
                         image_embeds=embeds, image_key="red")
    chunk = 6
    assert len(ids) > 2 * chunk
    engine = ContinuousEngine(model, max_rows=2, prefill_chunk=chunk)
    engine.submit(runner)
    engine.step()  # the runner decodes from now on
    engine.submit(long)
    joined_before, steps, first = engine.stats.joined_steps, 0, []
    while not first:
        steps += 1
        first = [e.token for e in engine.step() if e.id == "long" and e.token is not None]
    # One chunk of prefill_chunk tokens a step, each inside the runner's decode forward.
    assert steps == -(-len(ids) // chunk)
    assert engine.stats.joined_steps - joined_before == steps
    tokens, _ = _drain(engine)
    assert first + tokens["long"] == _alone(model, long)


def test_a_causal_prompt_ended_between_its_token_chunks_frees_its_slot(glm4v) -> None:
    model, tokenizer = glm4v
    runner_ids, _ = build_prompt_ids(model, tokenizer, "hi", [], image=False)
    runner = EngineRequest("runner", runner_ids, GenerationParams(max_new_tokens=30, sampling=GREEDY))
    ids, _ = build_prompt_ids(model, tokenizer, "a long question " * 6, [], image=False)
    engine = ContinuousEngine(model, max_rows=2, prefill_chunk=4)
    engine.submit(runner)
    first = [e.token for e in engine.step()]
    engine.submit(EngineRequest("long", ids, GenerationParams(max_new_tokens=5, sampling=GREEDY)))
    tokens, reasons = _drain(engine, end_at_step={"long": 2})
    assert reasons["long"] == "ended" and tokens.get("long", []) == []
    assert first + tokens["runner"] == _alone(model, runner)
    assert engine.prefill is None and engine.running == 0


def test_long_causal_prompts_beside_decoding_rows_are_admitted_one_at_a_time(glm4v) -> None:
    model, tokenizer = glm4v
    runner_ids, _ = build_prompt_ids(model, tokenizer, "hi", [], image=False)
    runner = EngineRequest("runner", runner_ids, GenerationParams(max_new_tokens=80, sampling=GREEDY))
    longs = [EngineRequest(f"long{i}", build_prompt_ids(model, tokenizer, f"question {i} is long " * 5, [],
                                                        image=False)[0],
                           GenerationParams(max_new_tokens=4, sampling=GREEDY)) for i in range(2)]
    engine = ContinuousEngine(model, max_rows=3, prefill_chunk=5)
    engine.group_tokens = lambda decoding: 10_000  # a group budget that would take both prompts
    engine.submit(runner)
    first = [e.token for e in engine.step()]
    for request in longs:
        engine.submit(request)
    first += [e.token for e in engine.step() if e.id == "runner"]
    # Token chunks take one prompt at a time.
    assert [row.request.id for row in engine.prefill.rows] == ["long0"] and len(engine.waiting) == 1
    tokens, _ = _drain(engine)
    assert first + tokens["runner"] == _alone(model, runner)
    for request in longs:
        assert tokens[request.id] == _alone(model, request)


LONG_PROMPT = [7 + i % 800 for i in range(60)] + [GMASK, SOP]  # staged over several steps at chunk 8


def _greedy(key: str, ids: list[int], tokens: int) -> EngineRequest:
    return EngineRequest(key, ids, GenerationParams(max_new_tokens=tokens, sampling=GREEDY))


def _finish_as_alone(engine: ContinuousEngine, events: list, requests: list[EngineRequest]) -> None:
    """Run ``engine`` to the end (at most 200 more steps: a row left without a prefill fails the test, it does
    not hang it); each request's tokens, ``events`` included, must be its answer alone."""
    for _ in range(200):
        if not engine.has_work():
            break
        events = events + engine.step()
    assert not engine.has_work()
    for request in requests:
        got = [e.token for e in events if e.id == request.id and e.token is not None]
        assert got == _alone(engine.model, request), request.id


def test_a_short_prompt_goes_ahead_of_a_long_causal_prefill_in_progress_and_of_the_queue(glm4v) -> None:
    model, tokenizer = glm4v

    def request(name: str, text: str, tokens: int) -> EngineRequest:
        ids, _ = build_prompt_ids(model, tokenizer, text, [], image=False)
        return _greedy(name, ids, tokens)

    runner = request("runner", "hi", 60)
    longs = [request(f"long{i}", f"question {i} is a long one " * 5, 4) for i in range(2)]
    short = request("short", "ok?", 5)
    chunk = 6
    assert len(short.ids) <= 2 * chunk < len(longs[0].ids)
    engine = ContinuousEngine(model, max_rows=4, prefill_chunk=chunk)
    engine.submit(runner)
    events = engine.step()
    for request_ in longs:
        engine.submit(request_)
    events += engine.step()  # long0's first token chunk; long1 waits for it
    assert [row.request.id for row in engine.prefill.rows] == ["long0"]
    engine.submit(short)  # behind long1 in the queue
    chunks_left = len(engine.prefill.later)
    step_events = engine.step()
    events += step_events
    # The short prompt was prefilled at once, in place of long0's chunk (long0 paused, long1 still waiting).
    assert sorted(e.id for e in step_events if e.token is not None) == ["runner", "short"]
    assert engine.stats.short_first == 1 and [r.id for r in engine.waiting] == ["long1"]
    assert engine.prefill.rows[0].request.id == "long0" and len(engine.prefill.later) == chunks_left
    _finish_as_alone(engine, events, [runner, short, *longs])


def test_a_short_prompt_goes_ahead_of_a_prompt_prefilled_in_layer_stages(text_model) -> None:
    long = _greedy("long", LONG_PROMPT, 4)
    runner = _greedy("runner", [11, 12, GMASK, SOP], 20)
    short = _greedy("short", [13, 14, 15, GMASK, SOP], 6)
    engine = ContinuousEngine(text_model, max_rows=3, context=96, prefill_chunk=8)
    engine.submit(runner)
    events = engine.step()
    engine.submit(long)
    events += engine.step()  # the first stage of the long prompt
    engine.submit(short)
    step_events = engine.step()
    events += step_events
    assert {e.id for e in step_events if e.token is not None} == {"runner", "short"}
    assert engine.prefill is not None and engine.prefill.rows[0].request.id == "long"
    _finish_as_alone(engine, events, [runner, short, long])


def test_short_prompts_arriving_at_every_step_take_every_other_step_of_a_long_prefill(text_model) -> None:
    long = _greedy("long", LONG_PROMPT, 2)
    runner = _greedy("runner", [11, 12, GMASK, SOP], 40)
    engine = ContinuousEngine(text_model, max_rows=8, context=96, prefill_chunk=8)
    engine.submit(runner)
    engine.step()
    engine.submit(long)
    engine.step()
    alone_steps = 1  # how many steps the long prefill takes with nothing going ahead of it
    probe = ContinuousEngine(text_model, max_rows=2, context=96, prefill_chunk=8)
    probe.submit(runner)
    probe.step()
    probe.submit(long)
    while not any(e.id == "long" for e in probe.step()):
        alone_steps += 1
    firsts, steps = {}, 1
    long_first = None
    while long_first is None:
        short = _greedy(f"short{steps}", [20 + steps, 21, GMASK, SOP], 1)
        engine.submit(short)
        steps += 1
        for event in engine.step():
            if event.token is not None and event.id != "runner":
                firsts.setdefault(event.id, steps)
        long_first = firsts.get("long")
    # Short prompts went first on every other step (those that came meanwhile together), never two steps in a
    # row, so the long prefill took about twice its steps.
    short_steps = sorted({step for key, step in firsts.items() if key != "long"})
    assert all(b - a == 2 for a, b in zip(short_steps, short_steps[1:], strict=False))
    assert len(short_steps) >= alone_steps - 1
    assert engine.stats.short_first == len(firsts) - 1
    assert long_first <= 2 * alone_steps + 1
    tokens, _ = _drain(engine)
    assert tokens.get("long", []) == _alone(text_model, long)[1:]  # its first token came in the loop


def test_short_prompts_going_first_fit_one_step_with_their_padding(text_model) -> None:
    # Chunk 8: one step holds 16 tokens. Prompts of 3 and 12 new tokens hold 15, but left-padded to one length
    # 24: only the first goes ahead of the long prefill, and every request still finishes, as alone.
    long = _greedy("long", LONG_PROMPT, 3)
    runner = _greedy("runner", [11, 12, GMASK, SOP], 30)
    small = _greedy("small", [13, GMASK, SOP], 3)
    larger = _greedy("larger", [14 + i for i in range(10)] + [GMASK, SOP], 3)
    engine = ContinuousEngine(text_model, max_rows=4, context=96, prefill_chunk=8)
    engine.submit(runner)
    events = engine.step()
    engine.submit(long)
    events += engine.step()
    engine.submit(small)
    engine.submit(larger)
    events += engine.step()
    assert engine.stats.short_first == 1 and [r.id for r in engine.waiting] == ["larger"]
    _finish_as_alone(engine, events, [runner, long, small, larger])


def test_a_long_conversation_whose_earlier_turns_are_cached_goes_first(glm4v) -> None:
    # GLM-4V is causal: a next turn resending 60+ tokens of cached conversation prefills only its new part,
    # which fits one step, so it too goes ahead of a long prompt in progress.
    model, tokenizer = glm4v
    first_ids, _ = build_prompt_ids(model, tokenizer, "tell me about shapes and colours " * 3, [], image=False)
    # Raw ids that share no leading token with turn 1. A newcomer that reuses nothing takes the lowest free
    # slot: the blocker holds slot 1 while turn 1 runs in slot 2, then frees it for the long prompt.
    runner = _greedy("runner", [500, 501, 502], 60)
    blocker = _greedy("blocker", [510, 511], 2)
    first = _greedy("turn1", first_ids, 4)
    long = _greedy("long", [600 + i for i in range(40)], 3)
    engine = ContinuousEngine(model, max_rows=4, prefill_chunk=6)
    for request in (runner, blocker, first):
        engine.submit(request)
    events = []
    while any(row is not None and row.request.id != "runner" for row in engine.rows) or engine.waiting:
        events += engine.step()
    answer = [e.token for e in events if e.id == "turn1" and e.token is not None]
    engine.submit(long)
    events += engine.step()
    turn2 = _greedy("turn2", first_ids + answer + [30, 31, 32], 3)
    assert len(turn2.ids) > engine.one_step_tokens and engine.prefill.rows[0].request.id == "long"
    engine.submit(turn2)
    step_events = engine.step()
    events += step_events
    assert engine.stats.short_first == 1 and "turn2" in {e.id for e in step_events if e.token is not None}
    _finish_as_alone(engine, events, [runner, blocker, first, long, turn2])
