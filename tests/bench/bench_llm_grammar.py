"""Decode speed with a JSON-Schema constraint against unconstrained decoding, for unitbus (llguidance
masks, units/llm/grammar.py) and llama-cpp-python (its GBNF grammar from the same schema), measured in
the same run on the same GGUF and thread count.

    python tests/bench/bench_llm_grammar.py [--peer-python /tmp/peer-llama/bin/python] [--tokens 128]

Greedy decoding of a chat prompt asking for JSON; unconstrained runs ban the end tokens so they produce
exactly --tokens tokens; constrained runs stop when the JSON is complete or at --tokens (correctness is
the tests' job, tests/units/llm/test_grammar.py). Decode tok/s
counts the tokens after the first one over the time after the first one; median of --repeats runs after
a warm-up. llama-cpp-python is only a peer: build it in a throwaway venv
(`python -m venv /tmp/peer-llama && /tmp/peer-llama/bin/pip install llama-cpp-python`), never here.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm import converted_gguf, peer_arguments, ran_as_child, run_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "models" / "mode_smollm2-135m-instruct.json"
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWrite a short story about a small robot who learns to paint the sea, as JSON with "
          "a title, the story and the list of characters.<|im_end|>\n<|im_start|>assistant\n")
SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 300},
                         "characters": {"type": "array", "items": {"type": "string"}}},
          "required": ["title", "story", "characters"]}


def child_unitbus(gguf: str, threads: int, tokens: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from units.llm.engine import load_llm
    from units.llm.grammar import build_constraint, llg_tokenizer
    from units.llm.sampler import Sampler

    engine = load_llm({"gguf": gguf, "threads": threads})
    ids = engine.encode(PROMPT)
    t0 = time.perf_counter()
    llg_tokenizer(engine)
    tokenizer_ms = (time.perf_counter() - t0) * 1000
    ban = {i: -1e9 for i in engine.stop_ids}
    out: dict = {"tokenizer_ms": tokenizer_ms}
    for name, make in (("free", lambda: None), ("schema", lambda: build_constraint(engine, SCHEMA))):
        rates, counts, compile_ms = [], [], []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            constraint = make()
            compile_ms.append((time.perf_counter() - t0) * 1000)
            gen = engine.generate(ids, Sampler(temperature=0.0, logit_bias=ban if constraint is None else {}), tokens,
                                  constraint=constraint)
            for _ in gen:
                pass
            rates.append((len(gen.tokens) - 1) / (gen.usage.decode_ms / 1000.0))
            counts.append(len(gen.tokens))
        out[name] = {"tps": statistics.median(rates[1:]), "tokens": counts[-1],
                     "compile_ms": statistics.median(compile_ms[1:])}
    return out


def child_peer(gguf: str, threads: int, tokens: int, repeats: int) -> dict:
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    out: dict = {}
    for name in ("free", "schema"):
        rates, counts, compile_ms = [], [], []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False) if name == "schema" else None
            compile_ms.append((time.perf_counter() - t0) * 1000)
            llm.reset()
            first = None
            n = 0
            for _ in llm.create_completion(ids, max_tokens=tokens, temperature=0.0, stream=True, grammar=grammar,
                                               logit_bias=None if grammar else {llm.token_eos(): -1e9}):
                n += 1
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            rates.append((n - 1) / (end - first))
            counts.append(n)
        out[name] = {"tps": statistics.median(rates[1:]), "tokens": counts[-1],
                     "compile_ms": statistics.median(compile_ms[1:])}
    return out


def main() -> None:
    args = peer_arguments(__doc__, "measured generations per mode (median)").parse_args()
    if ran_as_child(args, child_unitbus, child_peer):
        return
    gguf = converted_gguf()
    ours = run_child(sys.executable, "unitbus", args, gguf, __file__)
    peer = run_child(args.peer_python, "peer", args, gguf, __file__)
    print(f"SmolLM2-135M-Instruct Q4_1, {args.threads} threads, greedy, up to {args.tokens} tokens, "
          f"median of {args.repeats} runs; llguidance tokenizer build {ours['tokenizer_ms']:.0f} ms (once per engine)")
    print(f"{'metric':44s} {'unitbus':>10s} {'llama.cpp':>10s} {'ratio':>7s}")
    for label, key, fmt in (("decode tok/s, unconstrained", ("free", "tps"), ".1f"),
                            ("decode tok/s, JSON schema", ("schema", "tps"), ".1f"),
                            ("tokens generated, JSON schema", ("schema", "tokens"), ".0f"),
                            ("grammar compile (ms)", ("schema", "compile_ms"), ".1f")):
        a, b = ours[key[0]][key[1]], peer[key[0]][key[1]]
        print(f"{label:44s} {a:10{fmt}} {b:10{fmt}} {a / b:6.2f}x")
    for side, data in (("unitbus", ours), ("llama.cpp", peer)):
        print(f"{side}: constrained / unconstrained decode speed = {data['schema']['tps'] / data['free']['tps']:.2f}")


if __name__ == "__main__":
    main()
