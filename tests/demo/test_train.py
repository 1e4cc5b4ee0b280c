"""``visualglm demo train`` writes a loadable checkpoint in the official layout, with its training record."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visualglm.demo.recipe import TrainRecipe
from visualglm.demo.train import augment, lr_at

pytest.importorskip("easy_vqa", reason="the easy-vqa package (dev extra) holds the data set")


def test_a_short_training_run_writes_a_loadable_model(tmp_path) -> None:
    import visualglm
    from visualglm.demo.train import train

    out = train(tmp_path / "demo", TrainRecipe(vision_steps=2, steps=3, images_per_step=4, questions_per_image=2),
                progress=False, log=lambda *_: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "ice_text.model", "tokenizer_config.json", "training"} <= names
    assert (out / "training" / "loss.png").stat().st_size > 0
    losses = [json.loads(line)["loss"] for line in (out / "training" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert json.loads((out / "training" / "recipe.json").read_text())["steps"] == 3
    model = visualglm.load(out, progress=False)
    assert model.config.family == "visualglm" and model.config.eva_config.image_size == [64, 64]
    tokenizer = visualglm.load_tokenizer(out)
    assert tokenizer.vocab_size == model.config.vocab_size
    assert not list(tmp_path.glob(".demo.*")), "the staging directory was left behind"


def test_augmentation_keeps_the_shape_whole_and_is_seeded() -> None:
    pixels = torch.full((2, 3, 64, 64), 240, dtype=torch.uint8)
    pixels[:, 0, 10:20, 30:50] = 10  # a 10x20 block
    boxes = torch.tensor([[10, 19, 30, 49]] * 2)
    first = augment(pixels, boxes, random.Random(5), max_shift=64)
    again = augment(pixels, boxes, random.Random(5), max_shift=64)
    assert torch.equal(first, again)
    dark = first[:, 0] < first[:, 0].max() - 1  # the block, wherever it went
    assert dark.sum(dim=(1, 2)).tolist() == [200, 200]


def test_learning_rate_warms_up_then_decays() -> None:
    recipe = TrainRecipe(steps=100, warmup_steps=10, learning_rate=1.0)
    rates = [lr_at(step, recipe) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] == pytest.approx(0.05, abs=0.01)


def test_the_qformer_is_held_for_its_first_steps_only(tmp_path) -> None:
    """Stage 2 leaves the Q-Former as stage 1 left it for ``qformer_hold_steps`` steps, then trains it too."""
    import visualglm
    from visualglm.demo.train import train

    def run(name: str, steps: int, hold: int) -> dict[str, torch.Tensor]:
        recipe = TrainRecipe(vision_steps=2, steps=steps, qformer_hold_steps=hold, images_per_step=4,
                             questions_per_image=1, warmup_steps=1)
        model = visualglm.load(train(tmp_path / name, recipe, progress=False, log=lambda *_: None), progress=False)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    one_held, two_held, one_trained = run("a", 1, 1), run("b", 2, 2), run("c", 2, 1)
    qformer = [n for n in one_held if n.startswith("image_encoder.qformer.")]
    assert qformer
    assert all(torch.equal(one_held[n], two_held[n]) for n in qformer)  # the second held step left it alone
    assert not all(torch.equal(one_held[n], one_trained[n]) for n in qformer)  # once released, it learns
    words = "transformer.word_embeddings.weight"
    assert not torch.equal(one_held[words], two_held[words])  # while the language model learnt


def _brute_force_cost(lengths: list[int], overhead: int) -> int:
    """The cheapest cost over all 2^(n-1) ways to cut ``lengths`` into contiguous chunks."""
    import itertools

    best = None
    for cuts in itertools.product((False, True), repeat=len(lengths) - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(lengths)]
        cost = sum(lengths[e - 1] * (e - b) + overhead for b, e in zip(bounds, bounds[1:], strict=False))
        best = cost if best is None else min(best, cost)
    return best


def test_length_chunks_cover_the_batch_at_the_least_padded_cost() -> None:
    from visualglm.demo.train import length_chunks

    rng = random.Random(0)
    for _ in range(40):
        lengths = sorted(rng.randint(5, 200) for _ in range(rng.randint(1, 10)))
        overhead = rng.choice((0, 30, 400))
        chunks = length_chunks(lengths, overhead)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(chunks, chunks[1:], strict=False))
        cost = sum(lengths[e - 1] * (e - b) + overhead for b, e in chunks)
        assert cost == _brute_force_cost(lengths, overhead)
    assert length_chunks([10] * 8 + [200] * 8, 100) == [(0, 8), (8, 16)]


def test_the_step_loss_does_not_depend_on_how_the_batch_is_chunked() -> None:
    import visualglm
    from visualglm.demo import resolve_model
    from visualglm.demo.dialogue import LANG_MODES, TurnMix, image_facts, sample_conversation
    from visualglm.demo.train import make_example, step_loss

    path = resolve_model(None)
    model = visualglm.load(path, progress=False)
    tokenizer = visualglm.load_tokenizer(path)
    rng = random.Random(1)
    facts = image_facts("test")[:6]
    examples = [make_example(model, tokenizer, sample_conversation(f, rng.randint(1, 5), rng.choice(LANG_MODES),
                                                                  rng, TurnMix()), row)
                for row, f in enumerate(facts) for _ in range(3)]
    assert len({len(e.ids) for e in examples}) > 5
    embeds = torch.randn(len(facts), model.config.image_length, model.config.hidden_size)
    with torch.no_grad():
        whole = step_loss(model, examples, embeds, model.config.pad_token_id, buckets=1)
        for buckets, overhead in ((4, 0), (18, 0), (0, 0), (0, 40), (0, 10**6)):
            chunked = step_loss(model, examples, embeds, model.config.pad_token_id, buckets, overhead)
            torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_branch_dropout_acts_in_training_mode_only_and_is_removable() -> None:
    import visualglm
    from visualglm.demo import DEMO_MODEL_DIR
    from visualglm.demo.train import branch_dropout
    from visualglm.models.chatglm import chatglm_prompt_inputs

    model = visualglm.load(DEMO_MODEL_DIR, progress=False)
    ids = torch.tensor([[5, 6, 7, 8, model.config.gmask_token_id, model.config.bos_token_id, 9, 10]])
    positions, mask = chatglm_prompt_inputs(ids, model.config, [0])

    def hidden() -> torch.Tensor:
        with torch.no_grad():
            return model.hidden_states(ids, positions, mask)

    model.eval()
    plain = hidden()
    hooks = branch_dropout(model, 0.5)
    assert len(hooks) == 2 * len(model.transformer.layers)
    assert torch.equal(hidden(), plain)  # inference untouched
    model.train()
    torch.manual_seed(0)
    first = hidden()
    assert not torch.allclose(first, plain, atol=1e-3)
    torch.manual_seed(0)
    assert torch.equal(hidden(), first)  # seeded
    for hook in hooks:
        hook.remove()
    assert torch.equal(hidden(), plain)  # training mode without dropout: as in inference
    model.eval()


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory) -> dict[bool, Path]:
    """The recipe's vocabulary (``ice_text.model`` path) with and without ``answer_pieces``, trained once."""
    from visualglm.demo.recipe import TrainRecipe, train_tokenizer

    root = tmp_path_factory.mktemp("vocabularies")
    return {flag: train_tokenizer(root / str(flag), TrainRecipe().vocab_size, flag) for flag in (True, False)}


def test_the_yes_no_answers_get_whole_pieces_in_the_vocabulary(vocabularies) -> None:
    """The vocabulary's corpus is deduplicated, so without weight the answer "yes" is spelled in letters and
    starts with the bare "▁" that also starts "否" ("no"); with ``answer_pieces`` it is one piece."""
    from visualglm.tokenizers.chatglm import ChatGLMTokenizer

    tokenizers = {flag: ChatGLMTokenizer(path) for flag, path in vocabularies.items()}

    def pieces(answer_pieces: bool, text: str) -> list[str]:
        tokenizer = tokenizers[answer_pieces]
        return [tokenizer.convert_ids_to_tokens(i) for i in tokenizer.encode(text, add_special_tokens=False)]

    assert pieces(True, "yes") == ["▁yes"] and pieces(True, "no") == ["▁no"]
    assert pieces(False, "yes")[0] == "▁" == pieces(False, "否")[0]
    assert pieces(True, "is there a red shape?") == pieces(False, "is there a red shape?")


def test_the_recipe_rebuilds_the_shipped_vocabulary(vocabularies) -> None:
    """The default recipe's vocabulary is the shipped model's, piece for piece and score for score (a change
    to the corpus would make ``visualglm demo train`` build a different model from the one shipped)."""
    import sentencepiece as spm

    from visualglm.demo import DEMO_MODEL_DIR
    from visualglm.demo.recipe import TrainRecipe

    built = spm.SentencePieceProcessor(model_file=str(vocabularies[TrainRecipe().answer_pieces]))
    shipped = spm.SentencePieceProcessor(model_file=str(DEMO_MODEL_DIR / "ice_text.model"))
    assert built.get_piece_size() == shipped.get_piece_size()
    assert [(built.id_to_piece(i), built.get_score(i)) for i in range(built.get_piece_size())] == [
        (shipped.id_to_piece(i), shipped.get_score(i)) for i in range(shipped.get_piece_size())]


def test_the_names_are_read_from_the_pieces_a_sentence_spells_them_with() -> None:
    """Each colour and shape gets a piece of its own per language, the piece its name has inside a question."""
    from visualglm.demo import DEMO_MODEL_DIR
    from visualglm.demo.train import COLOR_NAMES, SHAPE_NAMES, name_piece_ids
    from visualglm.demo.translate import COLORS, SHAPES
    from visualglm.tokenizers.chatglm import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer(DEMO_MODEL_DIR / "ice_text.model")
    (colors_en, colors_zh), (shapes_en, shapes_zh) = name_piece_ids(tokenizer)
    assert [tokenizer.decode([int(i)]).strip() for i in colors_en] == list(COLOR_NAMES)
    assert [tokenizer.decode([int(i)]) for i in colors_zh] == [COLORS[name][0] for name in COLOR_NAMES]
    assert [tokenizer.decode([int(i)]).strip() for i in shapes_en] == list(SHAPE_NAMES)
    assert [tokenizer.decode([int(i)]) for i in shapes_zh] == ["圆", "矩", "三"]  # 三角形: not the shared 形
    for ids in (colors_en, colors_zh, shapes_en, shapes_zh):
        assert len(set(ids.tolist())) == len(ids)
    for name, piece in zip(COLOR_NAMES, colors_zh.tolist(), strict=True):  # as a question spells it
        assert piece in tokenizer.encode(f"图片里有{COLORS[name]}的形状吗？", add_special_tokens=False)
    assert int(shapes_zh[2]) in tokenizer.encode(f"这是{SHAPES['triangle']}吗", add_special_tokens=False)


def test_name_alignment_pulls_only_the_names_towards_the_images_they_name() -> None:
    from visualglm.demo.train import name_alignment_loss

    torch.manual_seed(0)
    words = torch.randn(50, 16) * 0.02
    names = [[torch.tensor([3, 4, 5]), torch.tensor([10, 11, 12])], [torch.tensor([20, 21]), torch.tensor([30, 31])]]
    labels = torch.tensor([[0, 1], [2, 0], [1, 1]])
    embeds = torch.randn(3, 8, 16)
    aligned = words.clone()
    for row, (colour, shape) in enumerate(labels.tolist()):  # each image's mean embedding is its names' direction
        embeds[row] = 0
        embeds[row, :, colour] = 1.0
        embeds[row, :, 8 + shape] = 1.0
        for ids in names[0]:
            aligned[ids[colour]] = 0.02 * F.one_hot(torch.tensor(colour), 16)
        for ids in names[1]:
            aligned[ids[shape]] = 0.02 * F.one_hot(torch.tensor(8 + shape), 16)
    words.requires_grad_(True)
    loss = name_alignment_loss(embeds, words, names, labels)
    loss.backward()
    assert loss.item() > name_alignment_loss(embeds, aligned, names, labels).item() + 1.0
    touched = {int(i) for kind in names for ids in kind for i in ids}
    rows_with_gradient = {int(i) for i in words.grad.abs().sum(dim=1).nonzero()}
    assert rows_with_gradient and rows_with_gradient <= touched  # no other word is moved
    assert name_alignment_loss(embeds, aligned * 100, names, labels).item() == pytest.approx(
        name_alignment_loss(embeds, aligned, names, labels).item(), rel=1e-5)  # cosines: scale-free


def test_name_alignment_trains_the_names_in_stage_one(tmp_path) -> None:
    """Stage 1 with the field on moves exactly the names' word embeddings that the same run without it leaves
    (stage 2's learning rate is too small to move any)."""
    import visualglm
    from visualglm.demo.train import name_piece_ids, train

    def embeddings(name: str, weight: float) -> torch.Tensor:
        recipe = TrainRecipe(vision_steps=3, steps=1, images_per_step=4, questions_per_image=1,
                             learning_rate=1e-12, name_alignment=weight)
        out = train(tmp_path / name, recipe, progress=False, log=lambda *_: None)
        return visualglm.load(out, progress=False).transformer.word_embeddings.weight.detach()

    off, on = embeddings("off", 0.0), embeddings("on", 0.5)
    tokenizer = visualglm.load_tokenizer(tmp_path / "on")
    moved = {int(i) for i in (on - off).abs().sum(dim=1).nonzero()}
    named = {int(i) for kind in name_piece_ids(tokenizer) for ids in kind for i in ids}
    assert moved == named
