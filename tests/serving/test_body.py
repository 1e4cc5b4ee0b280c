"""Request bodies are parsed with a bound on their values, and long strings never go through json.loads."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("pydantic", reason="the serve extra is not installed")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from visualglm.serving import body as body_module  # noqa: E402
from visualglm.serving.body import LONG_STRING, parse_json_body  # noqa: E402
from visualglm.serving.protocol import APIError  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30)


def _long(seed: int, alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(LONG_STRING + 4321))


@settings(max_examples=60, deadline=None)
@given(value=json_values, seed=st.integers(0, 3), ensure_ascii=st.booleans())
def test_same_result_as_json_loads_with_long_strings_lifted(value, seed: int, ensure_ascii: bool) -> None:
    # Long strings anywhere (as a value and in a list), with short ones and escapes around them.
    document = {"a": value, "image": _long(seed), "list": [_long(seed + 1, "é中x"), "q\"\\", value]}
    raw = json.dumps(document, ensure_ascii=ensure_ascii).encode()
    assert parse_json_body(raw, 10**6) == json.loads(raw)


def test_long_strings_do_not_reach_json_loads(monkeypatch) -> None:
    seen: list[int] = []
    real = json.loads
    monkeypatch.setattr(body_module.json, "loads", lambda text: seen.append(len(text)) or real(text))
    raw = json.dumps({"messages": [{"content": _long(0)}], "other": _long(1)}).encode()
    parse_json_body(raw, 1000)
    assert seen and max(seen) < 200


@pytest.mark.parametrize("raw", [
    b'{"a": "' + b"x" * (LONG_STRING + 10) + b'\x01"}',  # a control character inside a long string
    b'{"a": "' + b"x" * (LONG_STRING + 10),  # unterminated
    b'{"a": "' + b"x" * (LONG_STRING + 10) + b'" "b"}',
    b'{"a": "' + b"x" * (LONG_STRING + 10) + b'\xff\xfe"}',  # not UTF-8
    b"{not json", b"", b"\xff\xfe",
])
def test_invalid_json_stays_invalid(raw: bytes) -> None:
    with pytest.raises(APIError) as info:
        parse_json_body(raw, 10**6)
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_escaped_quotes_inside_long_strings() -> None:
    text = "x" * LONG_STRING + '"\\' + "y" * 10 + "\\\\"
    raw = json.dumps({"a": text, "b": [text, "z"]}).encode()
    assert parse_json_body(raw, 100) == {"a": text, "b": [text, "z"]}


def test_the_marker_cannot_be_forged() -> None:
    # A client that sends strings looking like a marker gets them back unchanged.
    raw = json.dumps({"a": "\u0000deadbeef#0", "b": _long(2)}).encode()
    assert parse_json_body(raw, 100)["a"] == "\u0000deadbeef#0"


def test_value_count_is_bounded_before_parsing(monkeypatch) -> None:
    monkeypatch.setattr(body_module.json, "loads", lambda text: pytest.fail("parsed"))
    bomb = b"[" + b"[]," * 200_000 + b"[]]"
    with pytest.raises(APIError) as info:
        parse_json_body(bomb, 100_000)
    assert info.value.status == 413 and info.value.code == "request_too_complex"
    with pytest.raises(APIError, match="more than 10 JSON values"):
        parse_json_body(json.dumps(list(range(11))).encode(), 10)


def test_deep_nesting_is_a_400_not_a_crash() -> None:
    with pytest.raises(APIError) as info:
        parse_json_body(b"[" * 100_000 + b"]" * 100_000, 10**6)
    assert info.value.status in (400, 413)
