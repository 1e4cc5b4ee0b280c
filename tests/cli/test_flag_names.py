"""One name per flag across the commands (the Python API's: ``--quantize``, ``--quantize-vision``,
``--quantize-output``, ``--overwrite``); the earlier spellings still parse to the same value, hidden."""

from __future__ import annotations

import re

import pytest

from visualglm.cli.main import build_parser
from visualglm.cli.options import quantize_also
from visualglm.cli.reference import generated

# (new command line, the same with the earlier spellings)
SPELLINGS = [
    (["ask", "--quantize", "4", "--quantize-vision", "--quantize-output", "hi"],
     ["ask", "--quant", "4", "--quant-vision", "--quant-output", "hi"]),
    (["chat", "--quantize", "8"], ["chat", "--quant", "8"]),
    (["serve", "--quantize", "8", "--quantize-output"], ["serve", "--quant", "8", "--quant-output"]),
    (["web", "--quantize", "4", "--quantize-vision"], ["web", "--quant", "4", "--quant-vision"]),
    (["bench", "--quantize", "8", "--quantize-output"], ["bench", "--quant", "8", "--quant-output"]),
    (["batch", "in.jsonl", "-o", "out.jsonl", "--quantize", "4"],
     ["batch", "in.jsonl", "-o", "out.jsonl", "--quant", "4"]),
    (["finetune", "--data", "d.json", "--out", "o", "--method", "qlora", "--quantize", "8"],
     ["finetune", "--data", "d.json", "--out", "o", "--method", "qlora", "--quant-bits", "8"]),
    (["quantize", "src", "dst", "--bits", "4", "--quantize-vision", "--quantize-output", "--overwrite"],
     ["quantize", "src", "dst", "--bits", "4", "--vision", "--output", "--force"]),
    (["convert", "src", "dst", "--overwrite"], ["convert", "src", "dst", "--overwrite"]),
    (["demo", "train", "--overwrite"], ["demo", "train", "--force"]),
]
OLD_FLAGS = ("--quant", "--quant-vision", "--quant-output", "--quant-bits", "--force")


@pytest.mark.parametrize(("new", "old"), SPELLINGS, ids=[new[0] for new, _ in SPELLINGS])
def test_both_spellings_parse_to_the_same_value(new: list[str], old: list[str]) -> None:
    parser = build_parser()
    assert vars(parser.parse_args(new)) == vars(parser.parse_args(old))


def test_the_values_land_where_the_commands_read_them() -> None:
    parser = build_parser()
    args = parser.parse_args(["ask", "--quantize", "4", "--quantize-output", "hi"])
    assert args.quant == 4 and quantize_also(args) == ("output",)
    assert parser.parse_args(["finetune", "--data", "d", "--out", "o"]).quant_bits == 4
    quantize = parser.parse_args(["quantize", "s", "d", "--bits", "8", "--quantize-vision", "--overwrite"])
    assert quantize.vision and not quantize.output and quantize.overwrite
    assert parser.parse_args(["demo", "train", "--overwrite"]).overwrite
    assert not parser.parse_args(["demo", "train"]).overwrite


def test_the_optional_parts_need_quantize() -> None:
    args = build_parser().parse_args(["ask", "--quantize-vision", "hi"])
    with pytest.raises(ValueError, match="--quantize-vision / --quantize-output need --quantize 8 or --quantize 4"):
        quantize_also(args)


def test_earlier_spellings_are_hidden_from_help_and_docs() -> None:
    page = generated()
    assert "--quantize" in page and "--overwrite" in page
    for flag in OLD_FLAGS:
        assert f"{flag} " not in page and f"`{flag}`" not in page, flag
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("ask", "serve", "quantize", "finetune", "demo"):
        text = commands[command].format_help()
        assert not re.search(r"(?<![\w-])(--quant(-vision|-output|-bits)?|--force|--vision|--output)\b", text), command
