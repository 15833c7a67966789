"""The streaming text assembler (UTF-8 hold-back, stop strings) and the ChatML renderer, without a model."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.chat_template import chatml_prompt, message_text
from units.llm.tokenizer import TextAssembler, complete_utf8_prefix


def feed(chunks, stops=()):
    asm = TextAssembler(stops)
    out = []
    for c in chunks:
        stopped = asm.add(c)
        out.append(asm.take())
        if stopped:
            break
    out.append(asm.finish())
    return out, asm.stopped


def test_complete_prefix_holds_unfinished_sequences():
    euro = "€".encode()  # 3 bytes
    assert complete_utf8_prefix(b"ab") == 2
    assert complete_utf8_prefix(b"a" + euro[:1]) == 1
    assert complete_utf8_prefix(b"a" + euro[:2]) == 1
    assert complete_utf8_prefix(b"a" + euro) == 4
    assert complete_utf8_prefix(b"a\x80\x80\x80\x80") == 5  # stray continuation bytes: not held


@given(st.text(min_size=1, max_size=40), st.lists(st.integers(1, 4), min_size=1, max_size=60))
def test_any_byte_split_reassembles_without_replacement(text, sizes):
    data = text.encode()
    chunks, i = [], 0
    for n in sizes * (len(data) // max(1, sum(sizes)) + 1):
        if i >= len(data):
            break
        chunks.append(data[i:i + n])
        i += n
    out, _ = feed(chunks)
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)


def test_invalid_bytes_become_replacement_characters():
    out, _ = feed([b"ok\xff", b"\xe2\x82", b"!"])  # 0xff is never valid; an unfinished euro sign then "!"
    assert "".join(out) == "ok\ufffd\ufffd!"
    out, _ = feed([b"end\xe2\x82"])
    assert "".join(out) == "end\ufffd"


def test_stop_string_across_chunks_is_cut_and_prefix_held():
    asm = TextAssembler(["<END>"])
    assert not asm.add(b"hello <E")
    assert asm.take() == "hello "  # "<E" could start the stop string: held back
    assert asm.add(b"ND> tail")
    assert asm.take() == "" and asm.finish() == ""


def test_held_prefix_is_released_when_it_does_not_complete():
    out, stopped = feed([b"a <E", b"xtra"], stops=["<END>"])
    assert "".join(out) == "a <Extra" and not stopped


def test_earliest_of_several_stops_wins():
    out, stopped = feed([b"one two three"], stops=["three", "two"])
    assert "".join(out) == "one " and stopped


def test_chatml_prompt_and_message_parts():
    assert chatml_prompt([], "S") == "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert chatml_prompt(msgs, None, add_generation_prompt=False) == "<|im_start|>user\nab<|im_end|>\n"
    with pytest.raises(TypeError):
        message_text([{"type": "image_url", "image_url": "x"}])
