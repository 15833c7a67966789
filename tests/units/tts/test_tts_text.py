"""Clause splitting for synthesis and the streaming sentence splitter (spec §10.5)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from units.tts.text import SentenceSplitter, split_clauses


def stream(text: str, step: int = 1, **kw) -> list[str]:
    """Feed `text` in pieces of `step` characters, as an llm would, then flush."""
    s = SentenceSplitter(**kw)
    out: list[str] = []
    for i in range(0, len(text), step):
        out += s.feed(text[i:i + step])
    rest = s.flush()
    return out + ([rest] if rest else [])


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_splits_at_sentence_punctuation(step):
    text = "Hello there, my friend. How are you today? I am fine! Thanks; see you"
    assert stream(text, step) == ["Hello there,", "my friend.", "How are you today?", "I am fine! Thanks;", "see you"]


def test_pieces_come_out_as_soon_as_complete():
    s = SentenceSplitter()
    assert s.feed("The first sentence is") == []
    assert s.feed(" here.") == []  # could still be "here.5" or an abbreviation: wait for the next char
    assert s.feed(" And") == ["The first sentence is here."]
    assert s.feed(" the second, which is longer") == ["And the second,"]
    assert s.flush() == "which is longer"
    assert s.flush() == ""


def test_decimals_thousands_and_abbreviations_are_not_split():
    text = "It costs 3.5 dollars, about 1,000 yen. Ask Dr. Smith, e.g. tomorrow at 10.30 a.m. please."
    assert stream(text) == [
        "It costs 3.5 dollars,", "about 1,000 yen.", "Ask Dr. Smith,", "e.g. tomorrow at 10.30 a.m.", "please."]


def test_short_fragments_join_the_next():
    assert stream("Yes, I can do that for you. OK. Bye now, friend.") == [
        "Yes, I can do that for you.", "OK. Bye now,", "friend."]
    assert stream("Hi.") == ["Hi."]  # flushed at the end even when short


def test_cjk_punctuation_needs_no_space():
    assert stream("你好，今天天气很好。我们去公园吧！好的", min_chars=2) == ["你好，", "今天天气很好。", "我们去公园吧！", "好的"]


def test_newlines_split():
    assert stream("First line of the list\nSecond line of the list\n\nThird part here") == [
        "First line of the list", "Second line of the list", "Third part here"]


def test_quotes_stay_with_their_sentence():
    assert stream('He said "I will be there." Then he left the room.') == [
        'He said "I will be there."', "Then he left the room."]


def test_run_on_text_is_cut_at_a_space():
    text = "word " * 100
    pieces = stream(text, step=7, max_chars=60)
    assert all(len(p) <= 60 for p in pieces)
    assert " ".join(pieces).split() == text.split()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(list("ab .,!?;\n3，。😀") + ["e.g. ", "Dr. "]), max_size=80).map("".join),
    st.integers(1, 9),
)
def test_no_text_is_lost_or_invented(text, step):
    pieces = stream(text, step)
    assert "".join("".join(pieces).split()) == "".join(text.split())
    assert all(p == p.strip() and p for p in pieces)


def test_clauses_carry_their_terminators():
    clauses = split_clauses("Well, hello there! Is it 3.5? Yes: e.g. this; done.\nNext line")
    assert [(c.text, c.terminator, c.sentence_end) for c in clauses] == [
        ("Well", ",", False), ("hello there", "!", True), ("Is it 3.5", "?", True),
        ("Yes", ":", False), ("e.g. this", ";", False), ("done", ".", True), ("Next line", "", True)]


def test_clause_edge_cases():
    assert split_clauses("") == [] and split_clauses(" ... ") == []
    assert [c.terminator for c in split_clauses("Really?!  Wow...")] == ["?", "."]
    assert [c.terminator for c in split_clauses("好的。你呢？")] == [".", "?"]
    assert split_clauses("a\x00b")[0].text == "a b"
