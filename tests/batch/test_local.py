"""`visualglm batch` on one machine, on the shipped demo model: good and bad rows, resuming after SIGKILL,
answers that do not depend on the batch a row ran in."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visualglm.batch import BatchSettings, ModelSpec, read_results, run_batch
from visualglm.batch.job import load_model

from .conftest import vqa_rows, write_rows

ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visualglm", "batch", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=ENV)


@pytest.fixture(scope="module")
def demo():
    return load_model(ModelSpec(), progress=False)


def _chat_answer(demo, query: str, image: Path | None, history=(), max_new_tokens: int = 12) -> str:
    """The oracle: what an interactive chat session answers, greedily, with the batch runs' token limit."""
    from visualglm.generation.chat import ChatSession
    from visualglm.generation.sampling import SamplingParams

    model, tokenizer = demo
    session = ChatSession(model, tokenizer, sampling=SamplingParams.visualglm().replace(do_sample=False),
                          history=list(history), max_new_tokens=max_new_tokens)
    if image is not None:
        session.set_image(image)
    return session.chat(query)


def test_good_and_bad_rows_on_the_demo_model(data_dir: Path, demo) -> None:
    (data_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    png = base64.b64encode((data_dir / "example-2.png").read_bytes()).decode()
    rows = [
        {"id": "shape", "image": "example-1.png", "prompt": "What shape is in the image?"},
        {"id": 2, "image": "example-2.png", "prompt": "What color is the shape?", "label": "kept out of the way"},
        {"id": "inline", "image": f"data:image/png;base64,{png}", "prompt": "What shape is in the image?"},
        {"id": "chat", "image": "example-3.png", "messages": [
            {"role": "user", "content": "What shape is in the image?"}, {"role": "assistant", "content": "circle"},
            {"role": "user", "content": "What color is the shape?"}]},
        {"id": "text", "prompt": "hello"},
        {"id": "missing", "image": "nowhere.png", "prompt": "What shape is in the image?"},
        {"id": "broken", "image": "broken.png", "prompt": "What shape?"},
        {"id": "remote", "image": "https://example.com/a.png", "prompt": "What shape?"},
        {"id": "scheme", "image": "file:///etc/hostname", "prompt": "What shape?"},
        {"id": "noprompt", "image": "example-1.png"},
        {"id": "cold", "prompt": "hello", "temperature": 0, "do_sample": True},
        {"id": "long", "prompt": "hello " * 700},
    ]
    source = write_rows(data_dir / "rows.jsonl", rows)
    output = data_dir / "out.jsonl"
    result = _cli(str(source), "-o", str(output), "--greedy", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "12 rows written to" in result.stderr and "(7 errors)" in result.stderr

    lines = output.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12 and all(line.endswith("}") for line in lines)
    out = read_results(output)
    assert set(out) == {json.dumps(row["id"]) for row in rows}
    errors = {key: record["error"] for key, record in out.items() if "error" in record}
    assert errors.keys() == {'"missing"', '"broken"', '"remote"', '"scheme"', '"noprompt"', '"cold"', '"long"'}
    assert f"file '{data_dir / 'nowhere.png'}': no such file" in errors['"missing"']
    assert f"file '{data_dir / 'broken.png'}'" in errors['"broken"']
    assert "--allow-remote-images" in errors['"remote"']
    assert "unsupported URL scheme 'file'" in errors['"scheme"']
    assert 'no "prompt"' in errors['"noprompt"']
    assert "temperature must be > 0" in errors['"cold"']
    assert "context is 1024 tokens" in errors['"long"']

    expected = {
        '"shape"': _chat_answer(demo, "What shape is in the image?", data_dir / "example-1.png"),
        "2": _chat_answer(demo, "What color is the shape?", data_dir / "example-2.png"),
        '"inline"': _chat_answer(demo, "What shape is in the image?", data_dir / "example-2.png"),
        '"chat"': _chat_answer(demo, "What color is the shape?", data_dir / "example-3.png",
                               [("What shape is in the image?", "circle")]),
        '"text"': _chat_answer(demo, "hello", None),
    }
    assert {key: out[key]["answer"] for key in expected} == expected
    assert expected['"shape"'] in {"circle", "rectangle", "triangle"}  # the demo model reads its images
    for key in expected:
        assert out[key]["finish_reason"] in {"stop", "length"}
        assert 1 <= out[key]["completion_tokens"] <= 12 and out[key]["prompt_tokens"] > 8


def test_a_folder_of_images_with_one_prompt(data_dir: Path, demo) -> None:
    output = data_dir / "out.jsonl"
    result = _cli(str(data_dir), "-o", str(output), "--prompt", "What shape is in the image?", "--greedy",
                  "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    out = read_results(output)
    assert sorted(out) == ['"example-1.png"', '"example-2.png"', '"example-3.png"']
    for key, record in out.items():
        assert record["answer"] == _chat_answer(demo, "What shape is in the image?", data_dir / json.loads(key))


def test_duplicate_ids_stop_the_job_before_anything_is_written(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                                  {"id": "a", "prompt": "z"}])
    result = _cli(str(source), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'visualglm batch: error: {source}:3: duplicate id "a" (first on line 1): ids must be unique, the '
        "output and resuming rely on them"]
    assert not (tmp_path / "out.jsonl").exists()


def test_a_text_only_model_records_image_rows_as_errors(tmp_path: Path, tiny_chat_checkpoint: Path) -> None:
    source = write_rows(tmp_path / "rows.jsonl", [{"id": 1, "prompt": "hello"},
                                                  {"id": 2, "prompt": "hello", "image": "a.png"}])
    summary = run_batch(source, tmp_path / "out.jsonl", spec=ModelSpec(str(tiny_chat_checkpoint)),
                        settings=BatchSettings(max_new_tokens=4), progress=False)
    assert (summary.written, summary.errors) == (2, 1)
    out = read_results(tmp_path / "out.jsonl")
    # Row 1 was answered (a random model may end its answer at once: any finish reason will do).
    assert "text-only" in out["2"]["error"] and "error" not in out["1"]
    assert out["1"]["finish_reason"] in ("stop", "length") and isinstance(out["1"]["answer"], str)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_output(data_dir: Path, demo) -> None:
    rows = vqa_rows(480)  # enough that the run is still going when it is killed, on a fast or a busy machine
    source = write_rows(data_dir / "rows.jsonl", rows)
    flags = ["--seed", "11", "--batch-size", "4", "--max-new-tokens", "24", "--flush-rows", "8",
             "--flush-seconds", "600", "--no-progress"]  # chunks by row count only (a slow machine may hit 5 s)
    reference = data_dir / "reference.jsonl"
    model, tokenizer = demo
    run_batch(source, reference, settings=BatchSettings(batch_size=4, seed=11, max_new_tokens=24), progress=False,
              model=model, tokenizer=tokenizer)

    output = data_dir / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "visualglm", "batch", str(source), "-o", str(output), *flags],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= 24:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: give it more rows"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    written = output.read_bytes()
    before = written.count(b"\n")
    assert 24 <= before < len(rows) and before % 8 == 0  # whole fsynced chunks only

    result = _cli(str(source), "-o", str(output), *flags)
    assert result.returncode == 0, result.stderr
    assert f", {before} already done" in result.stderr
    assert output.read_bytes().startswith(written)  # appended to, never rewritten
    lines = output.read_bytes().splitlines()
    assert len(lines) == len(rows)  # every id once: nothing redone, nothing lost
    assert read_results(output) == read_results(reference)


def test_a_seeded_answer_does_not_depend_on_the_batch_it_ran_in(data_dir: Path, demo) -> None:
    rows = vqa_rows(60, seed=5)
    model, tokenizer = demo

    def answers(order: list[dict], batch_size: int, seed: int = 3, name: str = "out") -> dict:
        path = data_dir / f"{name}-{batch_size}-{seed}.jsonl"
        source = write_rows(data_dir / f"{name}-{batch_size}-{seed}-in.jsonl", order)
        run_batch(source, path, settings=BatchSettings(batch_size=batch_size, seed=seed, max_new_tokens=16),
                  progress=False, model=model, tokenizer=tokenizer)
        return read_results(path)

    alone = answers(rows, 1)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert answers(shuffled, 8, name="shuffled") == alone
    # Half the rows, among other rows the first run never saw: the shared rows keep their answers.
    others = [{**row, "id": f"other-{i}"} for i, row in enumerate(vqa_rows(30, seed=9))]
    mixed = answers(rows[::2] + others, 32, name="mixed")
    assert {key: mixed[key] for key in alone if key in mixed} == {key: alone[key] for key in list(alone)
                                                                   if key in mixed}
    assert len([key for key in alone if key in mixed]) == 30
    # The seed matters (so the equalities above say something): another seed changes some sampled answers.
    other_seed = answers(rows, 8, seed=4)
    assert sum(other_seed[key]["answer"] != alone[key]["answer"] for key in alone) >= 3


def test_sigterm_saves_the_finished_rows_and_says_how_to_resume(data_dir: Path) -> None:
    source = write_rows(data_dir / "rows.jsonl", vqa_rows(400))
    output = data_dir / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "visualglm", "batch", str(source), "-o", str(output),
                                "--seed", "1", "--flush-rows", "4", "--no-progress"],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.02)
    seen = output.read_bytes().count(b"\n")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"interrupted: the rows finished so far are saved in {output}; run the same command to resume" in stderr
    data = output.read_bytes()
    assert data.endswith(b"\n") and seen <= data.count(b"\n") < 400
    assert all(json.loads(line)["id"] is not None for line in data.splitlines())
