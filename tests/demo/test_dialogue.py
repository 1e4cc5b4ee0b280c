"""Conversations: training examples use the chat's own prompt format; the evaluation sets are fixed and unseen."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("easy_vqa", reason="the easy-vqa package (dev extra) holds the data set")


@pytest.fixture(scope="module")
def test_facts():
    from visualglm.demo.dialogue import image_facts

    return image_facts("test")


def test_image_facts_agree_with_the_data_set(test_facts) -> None:
    from visualglm.demo.data import answer_for

    assert len(test_facts) >= 990
    for f in test_facts[:100]:
        for question, answer in f.questions:
            assert answer_for(question, f.color, f.shape) == answer


def test_evaluation_sets_are_fixed_and_held_out(test_facts) -> None:
    from visualglm.demo.dialogue import eval_conversations, heldout_oos_records, heldout_phrasing_records
    from visualglm.demo.phrasings import all_frames, expand
    from visualglm.demo.scoring import normalize

    facts = test_facts[:30]
    first = heldout_phrasing_records("zh", facts=facts)
    assert first == heldout_phrasing_records("zh", facts=facts)
    assert len(first) == 4 * 30 and {r.qtype for r in first} == {"color", "shape", "yes/no", "describe"}
    train = {normalize(f).replace(" ", "") for frame in all_frames("train") for f in expand(frame)}
    for record in first + heldout_phrasing_records("en", facts=facts):
        assert normalize(record.question).replace(" ", "") not in train, record.question
    oos = heldout_oos_records("en", facts=facts)
    assert {r.qtype for r in oos} == {"oos"} and oos == heldout_oos_records("en", facts=facts)
    conversations = eval_conversations("mixed", facts=facts)
    assert len(conversations) == 60 and all(len(c.turns) == 5 for c in conversations)
    assert conversations == eval_conversations("mixed", facts=facts)
    assert all(t.image == c.image for c in conversations for t in c.turns)
    langs = [{t.lang for t in c.turns} for c in conversations]
    assert any(len(s) == 2 for s in langs)  # mixed means mixed within a conversation
    assert all({t.lang for t in c.turns} == {"zh"} for c in eval_conversations("zh", facts=facts))
    with pytest.raises(ValueError, match="language mode"):
        eval_conversations("fr", facts=facts)


def test_a_training_example_is_exactly_what_chat_sends(tiny_visual_checkpoint, test_facts) -> None:
    """The prompt of a training example equals ``ChatSession.prompt_ids`` after the same history (here the
    conversation's reference answers), in both languages and mixed."""
    import visualglm
    from visualglm.demo.dialogue import TurnMix, history_of, sample_conversation
    from visualglm.demo.train import make_example
    from visualglm.generation.chat import ChatSession

    model = visualglm.load(tiny_visual_checkpoint, progress=False)
    tokenizer = visualglm.load_tokenizer(tiny_visual_checkpoint)
    rng = random.Random(4)
    for mode in ("en", "zh", "mixed"):
        conversation = sample_conversation(test_facts[0], 4, mode, rng, TurnMix())
        example = make_example(model, tokenizer, conversation)
        session = ChatSession(model, tokenizer, image=conversation.image,
                              history=history_of(conversation, 3))
        ids, start = session.prompt_ids(conversation.turns[-1].question)
        assert example.ids[:example.answer_start] == ids and example.image_start == start
        answer = tokenizer.encode(conversation.turns[-1].answers[0], add_special_tokens=False)
        assert example.ids[example.answer_start:] == answer + [tokenizer.eos_token_id]


def test_recasing_puts_english_turns_in_capitals_or_title_case_in_and_out_of_scope(test_facts) -> None:
    from visualglm.demo.dialogue import TurnMix, sample_turn

    def shouted(question: str) -> bool:
        words = [w for w in question.split(" ") if w[:1].isalpha()]
        return question.upper() == question or all(w[0].isupper() for w in words)

    rng = random.Random(7)
    always = [sample_turn(f, "en", rng, TurnMix(recase=1.0)) for f in test_facts[:200]]
    assert all(shouted(t.question) for t in always)
    assert {t.qtype for t in always} >= {"oos", "color", "shape", "yes/no"}  # in scope and out alike
    assert any(t.question.upper() == t.question for t in always)
    assert any(t.question.upper() != t.question for t in always)  # both forms
    never = [sample_turn(f, "en", rng, TurnMix()) for f in test_facts[:200]]
    # the grammar's own share only (one in ten), and one-word questions capitalised as sentences
    assert sum(map(shouted, (t.question for t in never))) < 50
    chinese = [sample_turn(f, "zh", random.Random(3), TurnMix(recase=1.0)) for f in test_facts[:50]]
    assert chinese == [sample_turn(f, "zh", random.Random(3), TurnMix()) for f in test_facts[:50]]
