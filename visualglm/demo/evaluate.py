"""Visual question answering accuracy: free-text answers from the chat templates, scored by normalised match.

Questions are answered on the continuous-batching engine that serves chat and HTTP requests, with the
prompts ``ChatSession`` builds (``build_prompt_ids``: VisualGLM-6B's template, ``Q:/A:`` for a question
without CJK characters and ``问：/答：`` otherwise, one image per question, earlier turns as history) and
greedy decoding, so the figure is what a user of ``visualglm chat`` sees, reproducibly. No classifier head
is involved: the model writes its answer and :mod:`visualglm.demo.scoring` judges it. Conversations are
answered turn by turn, each turn's history holding the model's own earlier answers, exactly as a chat keeps
them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from visualglm.config import image_size
from visualglm.demo.data import Record, build_records
from visualglm.demo.dialogue import Conversation
from visualglm.demo.scope import SCOPE_REPLY
from visualglm.demo.scoring import is_correct
from visualglm.generation.chat import (
    answer_postprocess,
    answer_stop_ids,
    build_prompt_ids,
    has_cjk,
    model_undecodable_ranges,
)
from visualglm.generation.continuous import ContinuousEngine, EngineRequest
from visualglm.generation.detok import DecodeStream
from visualglm.generation.engine import GenerationParams
from visualglm.generation.sampling import SamplingParams
from visualglm.image import load_image, preprocess


@dataclass
class EvalResult:
    """Correct/total per question type, and every (record, answer, correct) when kept."""

    correct: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)  # in-scope questions answered with the scope reply
    rows: list[tuple[Record, str, bool]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(self.total.values())

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / self.n if self.n else 0.0

    def by_type(self) -> dict[str, dict[str, float | int]]:
        return {t: {"accuracy": self.correct[t] / self.total[t], "correct": self.correct[t], "n": self.total[t]}
                for t in sorted(self.total)}

    def add(self, record: Record, answer: str, keep_row: bool) -> bool:
        """Score one answer; returns whether it is correct."""
        ok = is_correct(answer, record.answers)
        self.total[record.qtype] += 1
        self.correct[record.qtype] += int(ok)
        if record.qtype != "oos" and is_scope_reply(answer):
            self.refused[record.qtype] += 1
        if keep_row:
            self.rows.append((record, answer, ok))
        return ok

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "correct": sum(self.correct.values()),
                "refused": sum(self.refused.values()), "by_type": self.by_type()}


def easyvqa_records(split: str = "test", lang: str = "en", limit: int | None = None, seed: int = 0) -> list[Record]:
    """easy-VQA questions of ``split`` in ``lang``; ``limit`` picks a fixed seeded sample of that many."""
    records = build_records(split, langs=(lang,), describe_task=False)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        if limit < len(records):
            records = random.Random(seed).sample(records, limit)
    return records


def read_vqa_jsonl(path: str | Path) -> list[Record]:
    """Records from a jsonl file of ``{"image": path, "question": str, "answer": str | [str, ...]}`` lines
    (image paths relative to the file). Any bad line raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQA data file not found: {path}")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object with image, question and answer")
        missing = [k for k in ("image", "question", "answer") if k not in item]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        image, question, answer = item["image"], item["question"], item["answer"]
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: image must be a non-empty path string")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: question must be a non-empty string")
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip()
                                                                    for a in answers):
            raise ValueError(f"{where}: answer must be a non-empty string or a list of them")
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        if not image_path.is_file():
            raise ValueError(f"{where}: image file not found: {image_path}")
        lang = "zh" if has_cjk(question) else "en"
        qtype = item.get("type") if isinstance(item.get("type"), str) else "all"
        records.append(Record(str(image_path), question, tuple(answers), lang, qtype, number))
    if not records:
        raise ValueError(f"{path} holds no questions")
    return records


# Prompt tokens one prefill group may hold: evaluation is a throughput job, so newcomers are prefilled in big
# groups (a step that carries a group is slower, which no one is waiting on).
EVAL_PREFILL_CHUNK = 2048
# Records handed to the engine at once, in units of its rows (progress is reported after each such chunk).
CHUNK_BATCHES = 4


@torch.inference_mode()
def answer_batch(model, tokenizer, records: list[Record], max_new_tokens: int = 40,
                 histories: list[list[tuple[str, str]]] | None = None, max_rows: int = 64) -> list[str]:
    """Greedy answers to ``records`` (one image each, after ``histories[i]`` when given), generated on the
    continuous engine that serves chat and HTTP requests: up to ``max_rows`` at a time, a new question
    joining as soon as another ends. Each image is encoded once."""
    config = model.config
    size = image_size(config)
    device = next(model.parameters()).device
    cache: dict[str, torch.Tensor] = {}
    for record in records:
        if record.image not in cache:
            cache[record.image] = preprocess(load_image(record.image), size)
    paths = list(cache)
    image_embeds = torch.cat([model.encode_images(torch.cat([cache[p] for p in paths[i:i + max_rows]]).to(device))
                              for i in range(0, len(paths), max_rows)]) if paths else None
    row_of = {p: i for i, p in enumerate(paths)}
    banned = tuple(model_undecodable_ranges(model, tokenizer))
    params = GenerationParams(max_new_tokens=max_new_tokens, stop_ids=answer_stop_ids(config),
                              sampling=SamplingParams(do_sample=False, banned_ranges=banned))
    requests = []
    context = 0
    for i, record in enumerate(records):
        ids, start = build_prompt_ids(model, tokenizer, record.question, histories[i] if histories else [],
                                      image=True)
        row = row_of[record.image]
        requests.append(EngineRequest(i, ids, params, image_start=start, image_embeds=image_embeds[row:row + 1],
                                      image_key=record.image))
        context = max(context, len(ids) + max_new_tokens)
    if not requests:
        return []
    engine = ContinuousEngine(model, max_rows=min(max_rows, len(requests)), context=context,
                              prefill_chunk=EVAL_PREFILL_CHUNK)
    streams = [DecodeStream(tokenizer, postprocess=answer_postprocess(model)) for _ in records]
    try:
        for request in requests:
            engine.submit(request)
        while engine.has_work():
            for event in engine.step():
                if event.error is not None:
                    raise event.error
                if event.token is not None:
                    streams[event.id].push(event.token)
    finally:
        engine.close()
    for stream in streams:
        stream.flush()
    return [stream.text.strip() for stream in streams]


def evaluate(model, tokenizer, records: Iterable[Record], *, batch_size: int = 64, keep_rows: bool = False,
             on_batch: Callable[[int], None] | None = None) -> EvalResult:
    """Answer every record and score it, ``batch_size`` questions generating at a time (rows of the continuous
    engine). ``on_batch(n)`` is called after each chunk of n records."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    records = list(records)
    result = EvalResult()
    for begin in range(0, len(records), CHUNK_BATCHES * batch_size):
        chunk = records[begin:begin + CHUNK_BATCHES * batch_size]
        for record, answer in zip(chunk, answer_batch(model, tokenizer, chunk, max_rows=batch_size), strict=True):
            result.add(record, answer, keep_rows)
        if on_batch is not None:
            on_batch(len(chunk))
    return result


def is_scope_reply(answer: str) -> bool:
    """True when ``answer`` is the demo model's out-of-scope reply (either language)."""
    return any(is_correct(answer, reply) for reply in SCOPE_REPLY.values())


@dataclass
class ConversationResult:
    """One :class:`EvalResult` per turn (index 0 = turn 1), over all conversations."""

    turns: list[EvalResult]

    @property
    def n(self) -> int:
        return sum(t.n for t in self.turns)

    @property
    def accuracy(self) -> float:
        return sum(sum(t.correct.values()) for t in self.turns) / self.n if self.n else 0.0

    def summary(self) -> dict:
        by_turn = [t.summary() for t in self.turns]
        first = by_turn[0]["accuracy"] if by_turn else 0.0
        later = [t["accuracy"] for t in by_turn[1:]]
        return {"accuracy": self.accuracy, "n": self.n, "by_turn": by_turn,
                "max_drop_after_turn_1": max((first - a for a in later), default=0.0)}


def evaluate_conversations(model, tokenizer, conversations: Iterable[Conversation], *, batch_size: int = 64,
                           keep_rows: bool = False, on_batch: Callable[[int], None] | None = None
                           ) -> ConversationResult:
    """Answer every conversation turn by turn (turn k of all conversations in batches, after the model's
    own answers to turns 1..k-1) and score each turn."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    conversations = list(conversations)
    most = max((len(c.turns) for c in conversations), default=0)
    histories: list[list[tuple[str, str]]] = [[] for _ in conversations]
    result = ConversationResult([EvalResult() for _ in range(most)])
    for turn in range(most):
        active = [i for i, c in enumerate(conversations) if len(c.turns) > turn]
        for begin in range(0, len(active), CHUNK_BATCHES * batch_size):
            rows = active[begin:begin + CHUNK_BATCHES * batch_size]
            records = [conversations[i].turns[turn] for i in rows]
            answers = answer_batch(model, tokenizer, records, histories=[histories[i] for i in rows],
                                   max_rows=batch_size)
            for i, record, answer in zip(rows, records, answers, strict=True):
                result.turns[turn].add(record, answer, keep_rows)
                histories[i].append((record.question, answer))
            if on_batch is not None:
                on_batch(len(rows))
    return result
