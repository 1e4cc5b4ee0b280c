"""The ``visualglm`` command, run as a user would (subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visualglm", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_version_and_help() -> None:
    assert _run("--version").stdout.startswith("visualglm ")
    result = _run()
    assert result.returncode == 2 and "demo" in result.stderr and "info" in result.stderr


def test_info_describes_a_checkpoint(tiny_checkpoint: Path) -> None:
    result = _run("info", str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr
    assert "family:     ChatGLM-6B" in result.stdout
    assert "layers:     2, hidden 64, heads 4, vocab 1024" in result.stdout
    assert "stored as:  Hugging Face, float32, 1 file(s)" in result.stdout


def test_info_describes_a_sat_checkpoint(tmp_path: Path) -> None:
    from visualglm.checkpoint.sat import save_sat

    from ..conftest import random_chatglm

    save_sat(random_chatglm(), tmp_path / "sat", mp_size=2)
    result = _run("info", str(tmp_path / "sat"))
    assert result.returncode == 0, result.stderr
    assert "stored as:  sat, 2 model-parallel rank(s), 2 file(s)" in result.stdout


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    result = _run("info", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"visualglm info: error: checkpoint directory '{tmp_path / 'missing'}' does not exist"]


def test_bad_flag_is_rejected() -> None:
    result = _run("eval", "easyvqa", "--limit", "many")
    assert result.returncode == 2 and "invalid int value" in result.stderr


def _interactive(checkpoint: Path, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visualglm", "chat", "--model", str(checkpoint), *flags],
                          input=stdin, capture_output=True, text=True, timeout=120, check=False,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_chat_turns_clear_and_stop(tiny_chat_checkpoint: Path) -> None:
    result = _interactive(tiny_chat_checkpoint, "hello\nclear\nworld\nstop\nnever read\n", "--greedy",
                          "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ChatGLM: ") == 2  # two answers, nothing after stop
    assert result.stdout.count("'clear' starts over") == 2  # welcome again after clear


def test_chat_ends_on_end_of_input(tiny_chat_checkpoint: Path) -> None:
    result = _interactive(tiny_chat_checkpoint, "hello\n", "--max-new-tokens", "3", "--seed", "1")
    assert result.returncode == 0 and result.stdout.count("ChatGLM: ") == 1


def test_chat_too_long_prompt_is_reported_and_the_session_goes_on(tiny_chat_checkpoint: Path) -> None:
    long_text = "the quick brown fox jumps over the lazy dog " * 10
    result = _interactive(tiny_chat_checkpoint, f"{long_text}\nhi\nstop\n", "--max-length", "40",
                          "--max-new-tokens", "3")
    assert result.returncode == 0
    assert "error: max_length 40 leaves no room" in result.stderr
    assert result.stdout.count("ChatGLM: ") == 2


def test_ask_prints_only_the_answer(tiny_chat_checkpoint: Path) -> None:
    args = ["ask", "--model", str(tiny_chat_checkpoint), "--greedy", "--max-new-tokens", "6"]
    by_arg = _run(*args, "hello")
    by_stdin = subprocess.run([sys.executable, "-m", "visualglm", *args], input="hello", capture_output=True,
                              text=True, timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})
    assert by_arg.returncode == 0 and by_stdin.returncode == 0, by_arg.stderr
    assert by_arg.stdout == by_stdin.stdout and by_arg.stdout.endswith("\n")
    assert "Loading" not in by_arg.stdout


def test_ask_errors(tmp_path: Path) -> None:
    missing = _run("ask", "--model", str(tmp_path / "none"), "hi")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    no_image = _run("ask", "--image", str(tmp_path / "none.png"), "hi")  # default model, missing image
    assert no_image.returncode == 2 and "none.png" in no_image.stderr and "Traceback" not in no_image.stderr
    bad = _run("ask", "--model", str(tmp_path), "--top-p", "0", "hi")
    assert bad.returncode == 2 and "top_p" in bad.stderr
    bad_flag = _run("ask", "--temperature", "hot", "hi")
    assert bad_flag.returncode == 2 and "invalid float value" in bad_flag.stderr


def test_terminal_safe_escapes_control_characters() -> None:
    from visualglm.cli.options import terminal_safe

    assert terminal_safe("你好\n\tok") == "你好\n\tok"
    assert terminal_safe("a\x1b[2Jb\x07") == "a\\x1b[2Jb\\x07"


def _handled_ctrl_c(turn: str) -> bool:
    """The chat took the Ctrl-C (in the answer, or at the prompt) and shows the next prompt."""
    return any(mark in turn for mark in (" [interrupted]", "(type 'stop'")) and turn.rstrip().endswith("用户:")


def test_ctrl_c_interrupts_the_answer_not_the_chat(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    import json
    import shutil
    import signal
    import threading
    import time

    # Make answers long: the end-of-answer id becomes [MASK], which the random model samples only rarely.
    checkpoint = Path(shutil.copytree(tiny_chat_checkpoint, tmp_path / "endless"))
    config = json.loads((checkpoint / "config.json").read_text())
    config["eos_token_id"] = config["mask_token_id"]
    config["max_sequence_length"] = 200_000  # an answer would take far longer than the test waits
    (checkpoint / "config.json").write_text(json.dumps(config))
    process = subprocess.Popen([sys.executable, "-m", "visualglm", "chat", "--model", str(checkpoint), "--seed",
                                "1", "--max-length", "200000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"},
                               # A test run started in the background of a script ignores SIGINT, and a child
                               # inherits that: the chat must start with the terminal's default, as a user's does.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output: list[str] = []
    errors: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: process.stdout.read(1), "")), daemon=True)
    reader.start()
    threading.Thread(target=lambda: errors.extend(iter(process.stderr.readline, "")), daemon=True).start()

    def wait_until(condition, what: str) -> str:  # poll what the chat printed so far
        deadline = time.monotonic() + 60
        while not condition(text := "".join(output)):
            assert time.monotonic() < deadline, f"{what}: {text!r}; stderr: {''.join(errors)!r}"
            time.sleep(0.05)
        return text

    try:
        wait_until(lambda text: "用户: " in text, "no prompt")
        interrupted, turns = 0, 0
        # The random model may end an answer on its own (it can sample the end id) before Ctrl-C lands; the
        # signal then meets the prompt instead. Such a turn proves nothing: ask again, up to 6 turns.
        while interrupted < 2 and turns < 6:
            start = len("".join(output))
            turns += 1
            process.stdin.write(f"question {turns}\n")
            process.stdin.flush()
            wait_until(lambda text, start=start: text[start:].partition("ChatGLM: ")[2].strip(),
                       "the answer never started")
            process.send_signal(signal.SIGINT)
            # Write the next line only once the chat has handled the signal and shows a new prompt: a line
            # sent before could be swallowed by an input() the signal interrupts.
            text = wait_until(lambda text, start=start: _handled_ctrl_c(text[start:]), "no prompt after Ctrl-C")
            interrupted += " [interrupted]" in text[start:]
        process.stdin.write("stop\n")
        process.stdin.flush()
        process.wait(timeout=60)
        reader.join(timeout=10)
        out = "".join(output)
    finally:
        process.kill()
    assert process.returncode == 0, "".join(errors)
    assert interrupted == 2 and out.count("[interrupted]") == 2, out


def test_ask_about_an_image(tiny_visual_checkpoint: Path, tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    from ..conftest import make_png

    image = make_png(tmp_path / "red.png")
    result = _run("ask", "--model", str(tiny_visual_checkpoint), "--image", str(image), "--greedy",
                  "--max-new-tokens", "5", "describe")
    assert result.returncode == 0, result.stderr
    text_model = _run("ask", "--model", str(tiny_chat_checkpoint), "--image", str(image), "hi")
    assert text_model.returncode == 2 and "no image encoder" in text_model.stderr
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad = _run("ask", "--model", str(tiny_visual_checkpoint), "--image", str(tmp_path / "bad.png"), "hi")
    assert bad.returncode == 2 and "bad.png" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_image_command(tiny_visual_checkpoint: Path, tmp_path: Path) -> None:
    from ..conftest import make_png

    image = make_png(tmp_path / "blue.png", (0, 0, 255))
    # The reference flow: image first (a bad path is asked again), then questions; clear asks for an image
    # again, where Enter means text only.
    script = f"{tmp_path}/none.png\n{image}\ndescribe\nclear\n\nhello\nimage {image}\nagain\nstop\n"
    result = _interactive(tiny_visual_checkpoint, script, "--greedy", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "none.png" in result.stderr
    assert result.stdout.count("image path or URL") == 3  # twice at the start (bad path), once after clear
    # A VisualGLM model answers as "VisualGLM-6B:" (the reference cli_demo), text-only turns included
    assert result.stdout.count("VisualGLM-6B: ") == 3 and "ChatGLM: " not in result.stdout
    assert "(image loaded; new conversation)" in result.stdout
