"""Constrained decoding (units/llm/grammar.py) with the real SmolLM2 engine: JSON, JSON Schema, KBNF,
GBNF and Lark grammars; the output always matches, and bad grammars are refused with a reason."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from units.llm.grammar import GrammarConstraint, build_constraint, compile_grammar, kbnf_to_lark, llg_tokenizer
from units.llm.sampler import Sampler

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


def generate(engine, question: str, sampler: Sampler | None = None, max_new: int = 64, **request):
    ids = engine.encode(engine.chat_prompt([{"role": "user", "content": question}]))
    generation = engine.generate(ids, sampler or Sampler(temperature=0.0), max_new,
                                 constraint=build_constraint(engine, **request))
    text = "".join(generation)
    return text, generation


def test_format_json_gives_one_json_object(engine):
    text, generation = generate(engine, "Describe a cat as JSON.", format="json")
    assert generation.finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_schema_output_validates_even_when_sampling(engine, seed):
    jsonschema = pytest.importorskip("jsonschema")
    sampler = Sampler(temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=seed)
    text, generation = generate(engine, "Give me a person as JSON.", sampler, max_new=60, format=PERSON)
    assert generation.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_kbnf_grammar_output_matches(engine):
    grammar = """
        (* Ai00-style KBNF: the start symbol is `start` *)
        start ::= 'Answer: ' verdict '.' ;
        verdict ::= "yes" | "no" | #"maybe[!]{0,2}" ;
    """
    text, generation = generate(engine, "Is the sky blue?", grammar={"type": "kbnf", "text": grammar})
    assert generation.finish_reason == "stop"
    assert re.fullmatch(r"Answer: (yes|no|maybe!{0,2})\.", text), text


def test_gbnf_and_lark_grammars(engine):
    text, generation = generate(engine, "Pick a colour.", grammar={"type": "gbnf", "text": 'root ::= "red" | "green"'})
    assert text in ("red", "green") and generation.finish_reason == "stop"
    text, _ = generate(engine, "Count to five.", max_new=12,
                       grammar={"type": "lark", "text": 'start: DIGIT (", " DIGIT)*\nDIGIT: /[0-9]/'})
    assert re.fullmatch(r"[0-9](, [0-9])*,?( )?", text), text  # may stop at max_new mid-list


def test_repeating_grammar_ends_by_length_with_a_valid_prefix(engine):
    text, generation = generate(engine, "Write 'ab' forever.", max_new=10,
                                grammar={"type": "kbnf", "text": "start ::= {'ab'};"})
    assert generation.finish_reason in ("length", "stop")
    assert re.fullmatch(r"(ab)*a?", text), text


def test_mask_sets_forbidden_logits_to_minus_inf(engine):
    constraint = build_constraint(engine, grammar={"type": "kbnf", "text": "start ::= 'yes' | 'no';"})
    logits = np.zeros(engine.vocab_size, np.float32)
    constraint.apply(logits)
    allowed = np.flatnonzero(np.isfinite(logits))
    assert 0 < allowed.size < 20
    assert all(engine.decode([int(t)]) in ("y", "ye", "yes", "n", "no") for t in allowed)
    assert not any(int(t) in engine.stop_ids for t in allowed)  # the grammar cannot end yet
    token = engine.encode("yes")[0]
    assert constraint.allows(token)
    constraint.accept(token)
    if engine.decode([token]) == "yes":
        assert constraint.finished and constraint.accepting


def test_tokenizer_is_built_once_per_engine(engine):
    assert llg_tokenizer(engine) is llg_tokenizer(engine)


def test_kbnf_translation():
    lark = kbnf_to_lark("start ::= A [ 'x' ] { b }+ except!('\\n', 8);\nA ::= 'a';\nb ::= #\"[0-9]\";\nb ::= 'z';")
    assert lark.splitlines()[:3] == ['start: k_a ("x")? ((k_b)*)+ KBNF_EXCEPT_0',
                                     'k_a: "a"', 'k_b: /[0-9]/ | "z"']
    assert lark.splitlines()[3] == r"KBNF_EXCEPT_0: ~/(?s:.*\n.*)/ & /(?s:.{0,8})/"


@pytest.mark.parametrize("request_keys, reason", [
    ({"grammar": {"type": "kbnf", "text": "start ::= json_object;"}}, "undefined nonterminal 'json_object'"),
    ({"grammar": {"type": "kbnf", "text": "start ::= 'a'"}}, "expected ;"),
    ({"grammar": {"type": "kbnf", "text": "root ::= 'a';"}}, "no `start` rule"),
    ({"grammar": {"type": "kbnf", "text": "start ::= #ex\"a\";"}}, "line 1, column 11"),
    ({"grammar": {"type": "cfg", "text": "x"}}, "grammar.type"),
    ({"grammar": {"type": "lark", "text": "start: undefined_rule"}}, "invalid grammar"),
    ({"format": {"type": "objekt"}}, "objekt"),
    ({"format": "yaml"}, "format"),
    ({"format": "json", "grammar": {"type": "lark", "text": "start: \"a\""}}, "together"),
])
def test_bad_requests_are_value_errors(engine, request_keys, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        build_constraint(engine, **request_keys)


def test_nothing_asked_means_no_constraint(engine):
    assert compile_grammar() is None and build_constraint(engine, None, {}) is None
    assert isinstance(build_constraint(engine, "json"), GrammarConstraint)


def test_kbnf_regex_quotes_and_except(engine):
    grammar = r"""start ::= '{' ws '"name"' ':' ws name ',' ws '"says"' ':' ws '"' except!('"', 40) '"' '}';
                  name ::= #"\"[A-Za-z ]{1,20}\"";
                  ws ::= #"[ ]?";"""
    text, generation = generate(engine, "Give a character and a line they say, as JSON.", max_new=60,
                                grammar={"type": "kbnf", "text": grammar})
    assert generation.finish_reason == "stop"
    value = json.loads(text)
    assert list(value) == ["name", "says"] and re.fullmatch(r"[A-Za-z ]{1,20}", value["name"])
    assert '"' not in value["says"] and len(value["says"]) <= 40
