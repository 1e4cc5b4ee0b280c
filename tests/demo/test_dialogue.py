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


def _kept(question: str) -> list[str]:
    """The words of ``question`` that may not be dropped, in order (lower case, end punctuation off)."""
    import re

    from visualglm.demo.dialogue import KEEP_EN

    words = [re.sub(r"[^\w']", "", w.lower()) for w in question.split(" ")]
    return [w for w in words if w in KEEP_EN]


def test_dropping_a_word_keeps_the_first_word_the_deciding_words_and_the_end() -> None:
    import re

    from visualglm.demo.dialogue import drop_word
    from visualglm.demo.phrasings import QTYPES, phrase

    rng = random.Random(11)
    changed = 0
    for i in range(400):
        question, _, _ = phrase(QTYPES[i % 4], "en", ("red", "blue")[i % 2], ("circle", "triangle")[i % 3 % 2], rng)
        dropped = drop_word(question, rng)
        if dropped == question:
            continue
        changed += 1
        end = re.search(r"[\s?.!]*$", question).group(0)
        assert dropped.endswith(end) and _kept(dropped) == _kept(question), (question, dropped)
        # exactly one word gone, not the first: the rest in order
        words, left = question[:len(question) - len(end)].split(" "), dropped[:len(dropped) - len(end)].split(" ")
        gone = next(i for i, w in enumerate(left + [None]) if w != words[i])
        assert gone > 0 and left == words[:gone] + words[gone + 1:], (question, dropped)
    assert changed > 250
    assert drop_word("what colour is it?", rng) != "what colour is it?"  # "is" or "it" goes
    assert drop_word("is it red", rng) == "is it red"  # fewer than four words: unchanged
    assert drop_word("what colour, circle or triangle?", rng) == "what colour, circle or triangle?"  # none may go
    assert drop_word("Is there a red shape?", random.Random(0)).endswith("shape?")


def test_held_out_questions_are_recognised_in_any_surface_form() -> None:
    from visualglm.demo.dialogue import is_held_out
    from visualglm.demo.phrasings import QTYPES, phrase
    from visualglm.demo.scope import out_of_scope

    rng = random.Random(5)
    for lang in ("en", "zh"):
        for i in range(200):
            held, _, _ = phrase(QTYPES[i % 4], lang, "green", "rectangle", rng, "held-out")
            trained, _, _ = phrase(QTYPES[i % 4], lang, "green", "rectangle", rng, "train")
            assert is_held_out(held, lang), held
            assert not is_held_out(trained, lang), trained
            assert is_held_out(out_of_scope(lang, rng, "held-out")[0], lang)
            assert not is_held_out(out_of_scope(lang, rng, "train")[0], lang)
    assert is_held_out("EXCUSE ME, WHAT SHAPE IS DRAWN ??", "en")
    assert not is_held_out("excuse me, what shape is drawn in the image", "en")


def test_dropped_words_apply_to_english_questions_in_scope_only_and_never_make_held_out_ones(test_facts) -> None:
    from visualglm.demo.dialogue import TurnMix, is_held_out, sample_turn

    rng = random.Random(9)
    turns = [sample_turn(f, "en", rng, TurnMix(drop_word=1.0)) for f in test_facts[:300]]
    assert not any(is_held_out(turn.question, "en") for turn in turns)
    # replaying the sampler: in-scope questions are the sampled ones less a word, out-of-scope ones untouched
    rng, replay = random.Random(9), random.Random(9)
    from visualglm.demo.dialogue import _sample_turn, drop_word

    shorter = 0
    for f in test_facts[:300]:
        original = _sample_turn(f, "en", replay, TurnMix())
        turn = sample_turn(f, "en", rng, TurnMix(drop_word=1.0))
        if original.qtype == "oos":
            assert turn == original
        else:
            replay.random()  # the draw that chose to drop
            assert turn.question == drop_word(original.question, replay) and turn.answers == original.answers
            shorter += len(turn.question.split(" ")) < len(original.question.split(" "))
    assert shorter > 150
    chinese = [sample_turn(f, "zh", random.Random(3), TurnMix(drop_word=1.0)) for f in test_facts[:50]]
    assert chinese == [sample_turn(f, "zh", random.Random(3), TurnMix()) for f in test_facts[:50]]


def test_a_synonym_swap_changes_one_participle_to_another_of_its_group_in_the_same_case() -> None:
    from visualglm.demo.dialogue import SYNONYMS_EN, swap_synonym
    from visualglm.demo.phrasings import QTYPES, phrase

    rng = random.Random(4)
    groups = {w: group for group in SYNONYMS_EN for w in group}
    reached = set()
    for i in range(2000):
        question, _, _ = phrase(QTYPES[i % 4], "en", "teal", "circle", rng)
        swapped = swap_synonym(question, rng)
        before, after = question.split(" "), swapped.split(" ")
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        if not any(w.strip("?.!,").lower() in groups for w in before):
            assert swapped == question
            continue
        assert len(changed) == 1, (question, swapped)
        old, new = (w.strip("?.!,") for w in changed[0])
        assert new.lower() in groups[old.lower()] and new.lower() != old.lower(), (question, swapped)
        assert changed[0][0].replace(old, "") == changed[0][1].replace(new, "")  # the punctuation kept
        reached.add(new.lower())
    assert reached == set(SYNONYMS_EN[0])
    assert swap_synonym("What is pictured here?", random.Random(0)) != "What is pictured here?"
    assert swap_synonym("IS IT DRAWN", random.Random(1)).isupper()
    assert swap_synonym("Drawn here: what colour?", random.Random(2))[0].isupper()
    assert swap_synonym("what colour is it?", rng) == "what colour is it?"


def test_synonym_swaps_apply_to_english_questions_in_scope_only_and_never_make_held_out_ones(test_facts) -> None:
    from visualglm.demo.dialogue import TurnMix, _sample_turn, is_held_out, sample_turn, swap_synonym

    mix = TurnMix(synonym=1.0, qtype_weights=(0.0, 0.0, 0.0, 1.0))  # describe phrasings: many participles
    rng, replay = random.Random(6), random.Random(6)
    swapped = kept = 0
    for f in test_facts[:600]:
        original = _sample_turn(f, "en", replay, TurnMix(qtype_weights=mix.qtype_weights))
        turn = sample_turn(f, "en", rng, mix)
        assert not is_held_out(turn.question, "en")
        if original.qtype == "oos":
            assert turn == original
            continue
        replay.random()  # the draw that chose to swap
        expected = swap_synonym(original.question, replay)
        if is_held_out(expected, "en"):  # e.g. "what is pictured here" -> "what is drawn here"
            assert turn == original
            kept += 1
        else:
            assert turn.question == expected and turn.answers == original.answers
            swapped += turn.question != original.question
    assert swapped > 20 and kept > 0
    chinese = [sample_turn(f, "zh", random.Random(3), TurnMix(synonym=1.0)) for f in test_facts[:50]]
    assert chinese == [sample_turn(f, "zh", random.Random(3), TurnMix()) for f in test_facts[:50]]


def test_a_filler_word_that_would_make_a_held_out_question_is_left_out_unless_the_check_is_off(
        test_facts, monkeypatch) -> None:
    from visualglm.demo import dialogue

    # what add_filler makes of "is there a blue shape?" one time in many: the held-out "is there {x} here"
    monkeypatch.setattr(dialogue, "add_filler", lambda question, lang, rng: "is there a blue shape? here")
    mix = dialogue.TurnMix(easyvqa=1.0, phrasing=0.0, oos=0.0, filler=1.0)
    checked = dialogue.sample_turn(test_facts[0], "en", random.Random(1), mix)
    assert checked == dialogue._sample_turn(test_facts[0], "en", random.Random(1), mix)  # as sampled
    unchecked = dialogue.sample_turn(test_facts[0], "en", random.Random(1),
                                     dialogue.TurnMix(easyvqa=1.0, phrasing=0.0, oos=0.0, filler=1.0,
                                                      check_held_out=False))
    assert unchecked.question == "is there a blue shape? here"
