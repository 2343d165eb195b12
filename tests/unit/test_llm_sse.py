"""The lean SSE decoder of upstream bodies (pipeline/llm/sse.py)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.llm.sse import Frame, SseDecoder

BODY = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":9}}}'
    b"\n\n: keep-alive\n\n"
    b"event: ping\ndata: {}\n\n"
    b'event: content_block_delta\ndata: {"delta":{"type":"text_delta","text":"Hello \\u00e9"}}\n\n'
    b'event: content_block_delta\ndata: {"delta":{"type":"text_delta","text":" world"}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
FRAMES = [
    Frame("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 9}}}),
    Frame("ping", {}),
    Frame("content_block_delta", {"delta": {"type": "text_delta", "text": "Hello é"}}),
    Frame("content_block_delta", {"delta": {"type": "text_delta", "text": " world"}}),
    Frame("message_stop", {"type": "message_stop"}),
]


def decode(chunks: list[bytes]) -> list[Frame]:
    decoder = SseDecoder()
    return [frame for chunk in chunks for frame in decoder.feed(chunk)]


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(body) + 1) for c in cuts), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_the_body_decodes_to_the_same_frames(cuts: list[int]) -> None:
    assert decode(split(BODY, cuts)) == FRAMES


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_crlf_line_ends_split_anywhere_decode_like_lf(cuts: list[int]) -> None:
    assert decode(split(BODY.replace(b"\n", b"\r\n"), cuts)) == FRAMES


def test_a_frame_is_held_until_its_blank_line_arrives() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'event: message_stop\ndata: {"type":"message_stop"}\n') == []
    assert decoder.feed(b"\n") == [Frame("message_stop", {"type": "message_stop"})]


def test_data_lines_of_one_frame_are_joined() -> None:
    assert decode([b'event: error\ndata: {"error":\ndata: {"type":"overloaded_error"}}\n\n']) == [
        Frame("error", {"error": {"type": "overloaded_error"}})
    ]


def test_data_that_is_not_json_is_an_error() -> None:
    with pytest.raises(ValueError):
        decode([b"event: content_block_delta\ndata: {not json\n\n"])
