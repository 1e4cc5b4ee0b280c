"""What the shipped demo model is: its tokenizer corpus, its config and its training hyperparameters.

Everything here is fixed (seeded), so ``visualglm demo train`` rebuilds the same model on the same machine.
Only training text goes into the vocabulary: the held-out phrasings and out-of-scope inputs stay unseen.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from visualglm.config import EvaViTConfig, QFormerConfig, VisualGLMConfig
from visualglm.demo.data import corpus_lines
from visualglm.demo.dialogue import TurnMix
from visualglm.demo.translate import DESCRIBE_EN, DESCRIBE_ZH, YES_NO
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.tiny import train_chatglm_sentencepiece

_CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")
IMAGE_SIZE = 64  # easy-VQA's own size: no resampling of the training images
IMAGE_LENGTH = 8  # Q-Former queries = image tokens in the prompt (VisualGLM-6B has 32)


@dataclass(frozen=True)
class TrainRecipe:
    """Hyperparameters of ``visualglm demo train`` (defaults are the shipped model's)."""

    seed: int = 0
    # Stage 1: the image encoder alone learns colour and shape through temporary linear heads on the
    # mean-pooled tower tokens (the role a pretrained EVA-CLIP plays for VisualGLM-6B) and on the Q-Former's
    # image embeddings (BLIP-2's first stage). Trained end to end from scratch, answer tokens teach the tower
    # colours quickly but not shapes (chance after 1,200 steps).
    vision_steps: int = 600
    vision_learning_rate: float = 2e-3
    # Stage 2: the Q-Former, projection and language model on the questions (the vision tower frozen).
    steps: int = 3000
    freeze_vision: bool = True
    freeze_encoder: bool = False  # the Q-Former and projection too
    qformer_hold_steps: int = 300  # the Q-Former's learning rate is 0 for these first steps (train.py says why)
    images_per_step: int = 64  # each image is encoded once per step ...
    questions_per_image: int = 2  # ... and asked this many questions (each the last turn of a conversation)
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dropout: float = 0.0  # on the language model's attention and MLP outputs in stage 2 (train.branch_dropout)
    # The training mix. A question is the last turn of a conversation of 1..5 turns about its image (weights
    # below), each turn an easy-VQA question, a grammar phrasing or an out-of-scope input; a conversation is
    # all English, all Chinese or mixed turn by turn.
    turn_weights: tuple[float, ...] = (0.5, 0.2, 0.1, 0.1, 0.1)
    lang_mode_weights: tuple[float, float, float] = (0.35, 0.35, 0.3)  # en, zh, mixed
    easyvqa_weight: float = 0.32
    phrasing_weight: float = 0.51
    oos_weight: float = 0.17
    # grammar questions by type: color, shape, yes/no (which needs the question's probe matched against the
    # image, and negations read: the slowest to learn), describe
    qtype_weights: tuple[float, float, float, float] = (0.2, 0.2, 0.4, 0.2)
    filler: float = 0.25  # share of in-scope training questions given 1-2 filler words (dialogue.add_filler)
    recase: float = 0.15  # share of English turns in capitals or title case on top of the grammar's (dialogue.recase)
    drop_word: float = 0.25  # share of in-scope English questions that lose an unneeded word (dialogue.drop_word)
    synonym: float = 0.5  # share of in-scope English questions whose participle is swapped (dialogue.swap_synonym)
    # Leave a training question as sampled where filler words, a dropped word or a swapped participle made it a
    # held-out phrasing (dialogue.is_held_out): "is there a blue shape?" + "here" is the held-out "is there
    # {x} here". The model before this one was trained without the check (about 7 of 400,000 English turns).
    check_held_out: bool = True
    # A step's sequences, sorted by length, run in this many chunks of equal count (less padding); 0: in the
    # chunks that minimise padded tokens + chunk_overhead_tokens per chunk (train.length_chunks)
    length_buckets: int = 0
    chunk_overhead_tokens: int = 400
    max_shift: int = 64  # random translation of each image (px), kept so the shape stays whole
    vocab_size: int = 1000  # SentencePiece target (byte fallback pieces included)
    answer_pieces: bool = False  # the yes/no answers weigh in the vocabulary's corpus (recipe.tokenizer_corpus)
    # Weight of train.name_alignment_loss in both stages (0: off): the mean image embedding is classified by its
    # cosine with the word embeddings of the colour and shape names ("red" and "红" alike), so that a yes/no
    # question's probe word and the image it names start close, in both languages.
    name_alignment: float = 0.0
    threads: int = 0  # torch threads; 0 = torch's default

    def turn_mix(self) -> TurnMix:
        """Where stage 2's turns come from: the recipe's weights and augmentations as ``sample_turn`` reads them."""
        return TurnMix(easyvqa=self.easyvqa_weight, phrasing=self.phrasing_weight, oos=self.oos_weight,
                       filler=self.filler, qtype_weights=self.qtype_weights, recase=self.recase,
                       drop_word=self.drop_word, synonym=self.synonym, check_held_out=self.check_held_out)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field outside its range (before any training starts)."""
        at_least = {"steps": 1, "images_per_step": 1, "questions_per_image": 1, "vision_steps": 0,
                    "warmup_steps": 0, "qformer_hold_steps": 0, "length_buckets": 0, "chunk_overhead_tokens": 0,
                    "max_shift": 0, "threads": 0, "vocab_size": 300}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"recipe field {name} must be at least {low}, got {getattr(self, name)}")
        for name in ("filler", "recase", "drop_word", "synonym", "dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"recipe field {name} is a share: 0..1, got {getattr(self, name)}")
        if self.name_alignment < 0:
            raise ValueError(f"recipe field name_alignment must be at least 0, got {self.name_alignment}")
        for name in ("learning_rate", "vision_learning_rate", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"recipe field {name} must be positive, got {getattr(self, name)}")
        for name in ("turn_weights", "lang_mode_weights", "qtype_weights"):
            weights = getattr(self, name)
            if not weights or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"recipe field {name} needs weights >= 0 with a positive sum, got {weights}")
        if min(self.easyvqa_weight, self.phrasing_weight, self.oos_weight) < 0 or not (
                self.easyvqa_weight + self.phrasing_weight + self.oos_weight > 0):
            raise ValueError("recipe fields easyvqa_weight, phrasing_weight, oos_weight need weights >= 0 "
                             "with a positive sum")


def demo_config(tokenizer: ChatGLMTokenizer) -> VisualGLMConfig:
    """The demo model's config: VisualGLM-6B's architecture, small, with the tokenizer's special ids."""
    eva = EvaViTConfig(num_layers=4, hidden_size=128, num_attention_heads=4, inner_hidden_size=512,
                       image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=8,
                       max_sequence_length=1 + (IMAGE_SIZE // 8) ** 2)
    qformer = QFormerConfig(num_layers=2, hidden_size=128, num_attention_heads=4, inner_hidden_size=512,
                            vocab_size=IMAGE_LENGTH, is_decoder=[True, True], cross_attn_hidden_size=128)
    config = VisualGLMConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, num_layers=4, num_attention_heads=4,
        inner_hidden_size=512, max_sequence_length=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
        image_length=IMAGE_LENGTH, eva_config=eva, qformer_config=qformer)
    config.validate()
    return dataclasses.replace(config, extra={"architectures": ["ChatGLMModel"], "model_name": "visualglm-demo"})


def tokenizer_corpus(answer_pieces: bool = False) -> list[str]:
    """The vocabulary's training text: easy-VQA's train questions and answers (both languages), every form
    of the training phrasing frames, the training out-of-scope inputs, the replies and the prompt templates.
    ``answer_pieces``: the yes/no answers weigh as much as the replies (below; tried, not shipped)."""
    from visualglm.demo.data import build_records
    from visualglm.demo.phrasings import EN_PREFIXES, ZH_IMPERATIVE_PREFIXES, ZH_PREFIXES, all_frames, expand
    from visualglm.demo.scope import SCOPE_REPLY, TRAIN_INPUTS, expand_input

    lines = corpus_lines(build_records("train"))
    lines += [form for frame in all_frames("train") for form in expand(frame)]
    lines += [form for lang, inputs in TRAIN_INPUTS.items() for t in inputs for form in expand_input(t, lang)]
    lines += [p.strip() for p in (*EN_PREFIXES, *ZH_PREFIXES, *ZH_IMPERATIVE_PREFIXES) if p.strip()]
    lines += [*SCOPE_REPLY.values(), "<img></img>Q:\nA:", "<img></img>问：\n答：", DESCRIBE_EN, DESCRIBE_ZH]
    lines += [line[:1].upper() + line[1:] for line in lines if line[:1].islower()]  # "What ...", "Blue"
    # Chinese is learnt character by character: pieces spanning several words (v1 had "的形状是什么") split
    # new phrasings at odd places, single characters compose. The replies are frequent in the data, so
    # they get whole-word pieces. The deduplicated corpus spells the answer "yes" "▁ y e s", its first piece
    # "▁" also the first of "否" (no); answer_pieces makes "▁yes" a piece (a run with it: docs/demo-model.md).
    frequent = [*SCOPE_REPLY.values()] + ([*YES_NO, *YES_NO.values()] if answer_pieces else [])
    return [_CJK_RUN.sub(lambda m: " ".join(m.group(0)), line) for line in sorted(set(lines))] + frequent * 100


# Chinese "A-not-A" questions (是不是, 有没有, ...) ask yes or no; they negate nothing. Learnt character by
# character, their 不/没 look like the negation in "是不是没有……" or "……没有……，对吗", and the demo model
# read the negation from the sentence's frame instead (v4: "图片里没有X，对吗" right, "图片里没有X，是吗"
# inverted). As whole pieces they leave 不/没 to the negations.
A_NOT_A_PIECES = ("是不是", "有没有", "对不对", "能不能")


def train_tokenizer(directory: str | Path, vocab_size: int, answer_pieces: bool = False) -> Path:
    """SentencePiece vocabulary of the demo (ChatGLM-6B piece conventions) trained on
    :func:`tokenizer_corpus`, the A-not-A question words whole; returns the ``ice_text.model`` path."""
    return train_chatglm_sentencepiece(directory, tokenizer_corpus(answer_pieces), vocab_size=vocab_size,
                                       whole_pieces=A_NOT_A_PIECES)
