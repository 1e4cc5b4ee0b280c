"""The shipped demo model: it loads with the public loader and answers easy-VQA test questions correctly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from visualglm.demo import DEMO_MODEL_DIR, EXAMPLES_DIR, default_model_dir, resolve_model

pytest.importorskip("easy_vqa", reason="the easy-vqa package (dev extra) holds the data set")


@pytest.fixture(scope="module")
def demo():
    import visualglm

    path = default_model_dir()
    return visualglm.load(path, progress=False), visualglm.load_tokenizer(path)


def test_the_shipped_model_is_the_default_and_small() -> None:
    assert resolve_model(None) == DEMO_MODEL_DIR and resolve_model("visualglm-demo") == DEMO_MODEL_DIR
    assert resolve_model("elsewhere") == "elsewhere"
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20  # the demo model stays small enough to ship in the package
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "chatglm" and "eva_config" in config and "qformer_config" in config


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_it_answers_a_fixed_test_subset(demo, lang) -> None:
    from visualglm.demo.evaluate import easyvqa_records, evaluate

    model, tokenizer = demo
    records = easyvqa_records("test", lang, limit=50, seed=1234)
    result = evaluate(model, tokenizer, records, keep_rows=True)
    wrong = [(r.question, answer, r.answers[0]) for r, answer, ok in result.rows if not ok]
    assert result.n == 50
    assert sum(result.correct.values()) >= 45, wrong


def test_chat_session_answers_about_a_shipped_example(demo) -> None:
    from visualglm.generation.chat import ChatSession
    from visualglm.generation.sampling import SamplingParams

    model, tokenizer = demo
    session = ChatSession(model, tokenizer, sampling=SamplingParams(do_sample=False),
                          image=EXAMPLES_DIR / "example-1.png")  # a green circle
    assert session.chat("What color is the shape?").strip().lower().rstrip(".") == "green"
    session.clear_history()
    assert session.chat("图中是什么形状？").strip() == "圆形"


def test_a_multi_turn_chat_in_a_users_own_words(demo) -> None:
    """The conversation a new user has: one question after another about the same image, in both languages,
    in phrasings the training never showed (held-out), and an input the model cannot answer."""
    from visualglm.demo.scope import SCOPE_REPLY
    from visualglm.generation.chat import ChatSession
    from visualglm.generation.sampling import SamplingParams

    model, tokenizer = demo
    session = ChatSession(model, tokenizer, sampling=SamplingParams(do_sample=False),
                          image=EXAMPLES_DIR / "example-1.png")  # a green circle
    assert session.chat("What color is the shape?").strip().lower().rstrip(".") == "green"
    assert session.chat("描述这张图片。").strip() == "图中是一个绿色的圆形。"  # turn 2: not the colour again
    assert session.chat("Which shape do you see?").strip().lower().rstrip(".") == "circle"  # held out
    assert session.chat("你看到了哪种形状？").strip() == "圆形"  # held out
    assert session.chat("Hello, who are you?").strip() == SCOPE_REPLY["en"]
    assert session.chat("今天天气怎么样？").strip() == SCOPE_REPLY["zh"]
    assert session.chat("Is the shape green?").strip().lower().rstrip(".") == "yes"  # turn 7


def test_chinese_negations_are_read_whatever_the_sentence_ends_with(demo) -> None:
    """A green circle. v4 took "，对吗" for the negation: it inverted "……没有……，是吗" and "是不是看不到……"
    (held out) and half of "……有……，对吗". The A-not-A words (是不是, 有没有) are whole pieces now."""
    from visualglm.generation.chat import ChatSession
    from visualglm.generation.sampling import SamplingParams

    model, tokenizer = demo
    asked = {"图片里没有红色的图形，是吗？": "是", "图片里没有绿色的图形，是吗？": "否", "图中是不是看不到圆形？": "否",
             "图中是不是看不到三角形？": "是", "图中有圆形，对吗？": "是", "图中有矩形，对吗？": "否",
             "图里有没有绿色的东西？": "是"}
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("图中是不是没有圆形", add_special_tokens=False)]
    assert "是不是" in pieces and "没" in pieces
    for question, answer in asked.items():
        session = ChatSession(model, tokenizer, sampling=SamplingParams(do_sample=False),
                              image=EXAMPLES_DIR / "example-1.png")
        assert session.chat(question).strip() == answer, question


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visualglm", *args], capture_output=True, text=True, timeout=300,
                          check=False, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_eval_command_prints_a_table_and_a_json_line() -> None:
    result = _run("eval", "easyvqa", "--limit", "40", "--lang", "zh", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 40 and 0.85 <= summary["accuracy"] <= 1.0
    assert "overall" in result.stdout and "yes/no" in result.stdout


def test_demo_command_answers_in_both_languages() -> None:
    result = _run("demo")
    assert result.returncode == 0, result.stderr
    assert "Q: What color is the shape?" in result.stdout and "Q: 描述这张图片。" in result.stdout
    answers = [line.split("A: ", 1)[1] for line in result.stdout.splitlines() if "  A: " in line]
    assert answers[:2] == ["green", "circle"]  # example-1 is a green circle


def test_ask_uses_the_demo_model_without_model_flag() -> None:
    result = _run("ask", "--image", str(EXAMPLES_DIR / "example-2.png"), "--greedy", "What shape is in the image?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "triangle"


def test_eval_refuses_a_missing_adapter_clearly(tmp_path) -> None:
    result = _run("eval", "easyvqa", "--limit", "5", "--adapter", str(tmp_path / "no-adapter"))
    assert result.returncode == 2 and "no-adapter" in result.stderr and "Traceback" not in result.stderr
