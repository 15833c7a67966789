"""Constrained decoding for the llm engine with llguidance: a request's `format` ("json" or a JSON
Schema) or `grammar` ({"type": "kbnf"|"ebnf"|"gbnf"|"lark", "text": ...}) becomes a GrammarConstraint
that masks the logits of every step and follows the sampled tokens. Engine-side helper: numpy and
llguidance (imported lazily), no bus.

KBNF (Ai00's `bnf_schema`) is translated to llguidance's Lark dialect by kbnf_to_lark(). Supported:
`name ::= body;` rules (a name defined twice gets both bodies as alternatives), 'single' and "double"
quoted strings with backslash escapes, regexes #"..." / #'...' (Rust regex syntax, whole-lexeme
match), `|`, `( )`, `[ ]` (optional), `{ }` (zero or more), postfix `?` `*` `+`, `(* comments *)`, and
except!(string-or-regex[, n]) (any text not containing it, at most n characters). The start symbol
is `start`. Not supported (a ValueError names the position): #ex"..." regex complements, #e/#x
prefixed regexes, except!() of a nonterminal.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import weakref
from typing import Any

import numpy as np

from core.runtime import return_memory_to_os

log = logging.getLogger(__name__)

# Compact JSON (no free whitespace): small models otherwise fill the output with newlines and spaces.
JSON_DEFAULTS = {"whitespace_flexible": False}
GRAMMAR_TYPES = ("kbnf", "ebnf", "gbnf", "lark")

_tokenizers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


# --------------------------------------------------------------------------- request -> grammar

def compile_grammar(format: Any = None, grammar: Any = None) -> str | None:
    """The llguidance grammar for a request's `format` and `grammar` keys (None when both are empty).
    Raises ValueError for a malformed value; the grammar itself is checked by GrammarConstraint."""
    from llguidance import LLMatcher

    if format not in (None, "") and grammar not in (None, "", {}):
        raise ValueError("format and grammar cannot be used together")
    if format not in (None, ""):
        if format == "json":
            schema: Any = {"type": "object"}
        elif isinstance(format, dict):
            schema = format
        else:
            raise ValueError('format: expected "json" or a JSON Schema object')
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
    if grammar in (None, "", {}):
        return None
    if not isinstance(grammar, dict) or not isinstance(grammar.get("text"), str) or not grammar["text"].strip():
        raise ValueError('grammar: expected {"type": "kbnf"|"ebnf"|"gbnf"|"lark", "text": "..."}')
    kind = grammar.get("type", "kbnf")
    if kind not in GRAMMAR_TYPES:
        raise ValueError(f"grammar.type {kind!r} is not one of {', '.join(GRAMMAR_TYPES)}")
    text = grammar["text"]
    if kind == "kbnf":
        return LLMatcher.grammar_from_lark(kbnf_to_lark(text))
    if kind == "lark":
        return LLMatcher.grammar_from_lark(text)
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(text)
    except Exception as exc:  # the converter raises its own error types (and IndexError at the end of input)
        raise ValueError(f"grammar: cannot convert {kind.upper()}: {exc}") from None
    return LLMatcher.grammar_from_lark(lark)


# --------------------------------------------------------------------------- KBNF -> Lark

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\(\*.*?\*\))
  | (?P<assign>::=)
  | (?P<except>except!\s*\()
  | (?P<regex>\#(?P<rflags>[a-z]*)(?P<rq>["'])(?P<rbody>(?:\\.|(?!(?P=rq)).)*)(?P=rq))
  | (?P<string>(?P<sq>["'])(?P<sbody>(?:\\.|(?!(?P=sq)).)*)(?P=sq))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<int>\d+)
  | (?P<punct>[;|()\[\]{}?*+,])
""", re.VERBOSE | re.DOTALL)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"'}
# Characters a Rust regex needs escaped to match themselves literally.
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in "xu" and body[i + 2:i + 3] == "{":  # Rust-style \u{XXXX}
                end = body.index("}", i)
                out.append(chr(int(body[i + 3:end], 16)))
                i = end + 1
                continue
            if nxt == "x":
                out.append(chr(int(body[i + 2:i + 4], 16)))
                i += 4
                continue
            if nxt == "u":
                out.append(chr(int(body[i + 2:i + 6], 16)))
                i += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _regex_literal(text: str) -> str:
    return "".join("\\n" if c == "\n" else "\\t" if c == "\t" else "\\r" if c == "\r"
                   else "\\" + c if c in _REGEX_META else c for c in text)


def _lark_regex(pattern: str) -> str:
    return "/" + pattern.replace("/", "\\/") + "/"


class _KbnfParser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, Any, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise self.error(pos, "unexpected character")
            kind = next(k for k in ("ws", "assign", "except", "regex", "string", "name", "int", "punct")
                        if m.group(k) is not None)
            if kind == "regex":
                if m.group("rflags"):
                    raise self.error(pos, f"#{m.group('rflags')}\"...\" regexes are not supported")
                self.tokens.append(("regex", m.group("rbody"), pos))
            elif kind == "string":
                try:
                    self.tokens.append(("string", _unescape(m.group("sbody")), pos))
                except ValueError:
                    raise self.error(pos, "bad escape in string") from None
            elif kind == "punct":
                self.tokens.append((m.group(), m.group(), pos))
            elif kind != "ws":
                self.tokens.append((kind, m.group(), pos))
            pos = m.end()
        self.i = 0
        self.terminals: list[str] = []  # Lark terminal definitions for except!()

    def error(self, pos: int, message: str) -> ValueError:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return ValueError(f"KBNF grammar: {message} at line {line}, column {col}: {self.text[pos:pos + 20]!r}")

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self, kind: str | None = None) -> tuple[str, Any, int]:
        if self.i >= len(self.tokens):
            raise self.error(len(self.text), f"expected {kind or 'more'} but the grammar ended")
        tok = self.tokens[self.i]
        if kind is not None and tok[0] != kind:
            raise self.error(tok[2], f"expected {kind!r}")
        self.i += 1
        return tok

    def rules(self) -> list[tuple[str, str, int]]:
        out = []
        while self.peek() is not None:
            _, name, pos = self.take("name")
            self.take("assign")
            body = self.alternation()
            self.take(";")
            out.append((name, body, pos))
        return out

    def alternation(self) -> str:
        parts = [self.sequence()]
        while self.peek() == "|":
            self.take()
            parts.append(self.sequence())
        return " | ".join(parts)

    def sequence(self) -> str:
        items = []
        while self.peek() not in (None, "|", ";", ")", "]", "}", ","):
            items.append(self.postfix())
        if not items:
            pos = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
            raise self.error(pos, "empty alternative")
        return " ".join(items)

    def postfix(self) -> str:
        item = self.atom()
        while self.peek() in ("?", "*", "+"):
            item = f"({item}){self.take()[0]}"
        return item

    def atom(self) -> str:
        kind, value, pos = self.take()
        if kind == "name":
            return "\0" + value + "\0"  # a nonterminal reference, renamed once every rule is known
        if kind == "string":
            return json.dumps(value, ensure_ascii=False)
        if kind == "regex":
            return _lark_regex(value)
        if kind in ("(", "[", "{"):
            inner = self.alternation()
            self.take({"(": ")", "[": "]", "{": "}"}[kind])
            return f"({inner})" + {"(": "", "[": "?", "{": "*"}[kind]
        if kind == "except":
            return self.except_()
        raise self.error(pos, "expected a name, a string, a regex or a group")

    def except_(self) -> str:
        kind, value, pos = self.take()
        if kind == "string":
            pattern = _regex_literal(value)
        elif kind == "regex":
            pattern = f"(?:{value})"
        else:
            raise self.error(pos, "except!() takes a string or a regex")
        limit = None
        if self.peek() == ",":
            self.take()
            limit = int(self.take("int")[1])
        self.take(")")
        name = f"KBNF_EXCEPT_{len(self.terminals)}"
        body = f"~{_lark_regex(f'(?s:.*{pattern}.*)')}"
        if limit is not None:
            body += f" & {_lark_regex(f'(?s:.{{0,{limit}}})')}"
        self.terminals.append(f"{name}: {body}")
        return name


def kbnf_to_lark(text: str) -> str:
    """Lark (llguidance dialect) for a KBNF grammar; ValueError with the position of a problem."""
    parser = _KbnfParser(text)
    rules = parser.rules()
    if not rules:
        raise ValueError("KBNF grammar: no rules")
    bodies: dict[str, list[str]] = {}
    for name, body, _ in rules:
        bodies.setdefault(name, []).append(body)
    if "start" not in bodies:
        raise ValueError("KBNF grammar: no `start` rule")
    # Lark rule names are lower case (upper case names are terminals): give every KBNF name a unique one.
    names: dict[str, str] = {}
    for name in bodies:
        base = "start" if name == "start" else "k_" + name.lower()
        lark, n = base, 1
        while lark in names.values():
            n += 1
            lark = f"{base}_{n}"
        names[name] = lark

    def rename(match: re.Match) -> str:
        ref = match.group(1)
        if ref not in names:
            pos = next((p for _, body, p in rules if f"\0{ref}\0" in body), 0)
            raise ValueError(f"KBNF grammar: undefined nonterminal {ref!r} (used in the rule at "
                             f"line {text.count(chr(10), 0, pos) + 1})")
        return names[ref]

    lines = [f"{names[name]}: " + " | ".join(re.sub(r"\0(\w+)\0", rename, b) for b in alternatives)
             for name, alternatives in bodies.items()]
    return "\n".join(lines + parser.terminals) + "\n"


# --------------------------------------------------------------------------- the constraint

def llg_tokenizer(engine: Any) -> Any:
    """The llguidance tokenizer of an engine (built once per engine from its tokenizer.json, with its
    end tokens as EOS; about 0.2 s and 35 MB resident for a 49k vocabulary, plus about 18 MB for the
    llguidance library itself). Keeps llguidance's default mask "slices": 15 MB more than none, and
    masks 2-3x faster (0.2 ms instead of 0.5 ms per step inside a JSON string for SmolLM2)."""
    with _tokenizers_lock:
        tok = _tokenizers.get(engine)
        if tok is None:
            from llguidance import LLTokenizer

            t0 = time.perf_counter()
            text = (engine.model_dir / "tokenizer.json").read_text(encoding="utf-8")
            tok = LLTokenizer(text, n_vocab=engine.vocab_size, eos_token=sorted(engine.stop_ids))
            _tokenizers[engine] = tok
            del text
            # The build's scratch (tokenizer.json parsing) is freed but kept by malloc: about 25 MB back.
            return_memory_to_os()
            log.info("llguidance tokenizer built in %.0f ms", (time.perf_counter() - t0) * 1000)
        return tok


class GrammarConstraint:
    """One generation's grammar state: masks logits to the tokens the grammar allows next (the end
    tokens only once the grammar may end), follows sampled tokens, and says when nothing may follow.

    Per step: apply(logits) before sampling, then accept(token) for every kept token that is not an
    end token; stop when `finished`."""

    def __init__(self, tokenizer: Any, grammar: str):
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise ValueError(f"invalid grammar: {error.strip()}")
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"invalid grammar: {self.matcher.get_error()}")
        self.vocab_size = int(tokenizer.vocab_size)
        self._bits = np.zeros((self.vocab_size + 31) // 32, np.int32)
        self._allowed = np.zeros(self.vocab_size, bool)

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar forbids now to -inf (in place)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        self._allowed = np.unpackbits(self._bits.view(np.uint8), count=self.vocab_size, bitorder="little").view(bool)
        n = min(self.vocab_size, logits.shape[0])
        np.copyto(logits[:n], -np.inf, where=~self._allowed[:n])
        logits[n:] = -np.inf  # ids the grammar's tokenizer does not know

    def allows(self, token: int) -> bool:
        """Whether the last apply() allowed token."""
        return 0 <= token < self.vocab_size and bool(self._allowed[token])

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"grammar matcher rejected token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing may follow but an end token: the output is complete."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar."""
        return self.matcher.is_accepting()


def build_constraint(engine: Any, format: Any = None, grammar: Any = None) -> GrammarConstraint | None:
    """A GrammarConstraint for a request's `format`/`grammar` on engine (None when both are empty).
    ValueError (with the reason) for anything malformed or invalid."""
    spec = compile_grammar(format, grammar)
    if spec is None:
        return None
    return GrammarConstraint(llg_tokenizer(engine), spec)
