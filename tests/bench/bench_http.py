"""Bus and gateway overhead: tokens/s and time to first token seen by streaming HTTP clients, against the
llm engine alone (`units.llm.engine.load_llm`), measured in the same run on the same prompt.

    python tests/bench/bench_http.py [--tokens 128] [--rounds 3] [--threads 2]

Greedy decoding with the end tokens biased by -100 (the most an OpenAI logit_bias allows) on every side,
so each side generates the same --tokens tokens. Sides:
- engine: generate() in this process (first delta = first ~3 tokens, as the unit streams them);
- openai: the `openai` client streaming /v1/chat/completions through a real stack (sys, llm unit, gateway);
- ollama: the `ollama` client streaming /api/chat on the same stack;
- stackflow: a script on TCP 10001 through the bridge and sys, streaming llm.chat_completion.
TTFT is request sent -> first text delta; decode tok/s is (tokens - 1) over the time after the first delta;
e2e tok/s is tokens over the whole request. Best of --rounds. The sides take turns within each round (the
idle stack costs next to nothing while the engine runs), so a noisy shared machine slows all sides alike.
--threads sets onnxruntime's threads on every side: with as many threads as cores, every message the
bus, gateway and client handle takes CPU time from the engine; with a core left free (as on a board
whose NPU runs the model) the ratio shows the bus and gateway alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MANIFEST = ROOT / "models" / "mode_smollm2-135m-instruct.json"
MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a long story about a small robot who learns to paint the sea."}]


def load_engine(threads: int):
    from units.llm.engine import load_llm

    engine = load_llm({**json.loads(MANIFEST.read_text())["mode_param"], "threads": threads})
    return engine, {str(i): -100 for i in engine.stop_ids}


def engine_side(engine, tokens: int, rounds: int) -> list[dict]:
    from units.llm.sampler import Sampler

    ids = engine.encode(engine.chat_prompt(MESSAGES))
    ban = {i: -100.0 for i in engine.stop_ids}
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        first = None
        gen = engine.generate(ids, Sampler(temperature=0.0, logit_bias=ban), tokens)
        with gen:
            for _delta in gen:
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        out.append(measure(started, first, end, gen.usage.completion_tokens))
    return out


def measure(started: float, first: float | None, end: float, completion: int) -> dict:
    first = first if first is not None else end
    return {"ttft_ms": (first - started) * 1000, "tokens": completion,
            "decode_tps": (completion - 1) / (end - first) if end > first else float("nan"),
            "e2e_tps": completion / (end - started)}


def openai_side(url: str, tokens: int, rounds: int, bias: dict) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        first = None
        usage = None
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=tokens, temperature=0,
                                                logit_bias=bias, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
        end = time.perf_counter()
        out.append(measure(started, first, end, usage.completion_tokens))
    return out


def ollama_side(url: str, tokens: int, rounds: int, bias: dict) -> list[dict]:
    import ollama

    client = ollama.Client(host=url, timeout=300)
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        first = None
        last = None
        # The ollama API has no logit_bias: the end token is left alone, so this side may stop early.
        for chunk in client.chat(model=MODEL, messages=MESSAGES, stream=True,
                                 options={"num_predict": tokens, "temperature": 0}):
            if chunk.message.content and first is None:
                first = time.perf_counter()
            last = chunk
        end = time.perf_counter()
        out.append(measure(started, first, end, last.eval_count))
    return out


def stackflow_side(port: int, tokens: int, rounds: int, bias: dict) -> list[dict]:
    from support import StackFlowClient

    out = []
    with StackFlowClient(port, timeout=300) as c:
        setup = c.request({"request_id": "s", "work_id": "llm", "action": "setup",
                           "data": {"model": MODEL, "response_format": "llm.utf-8.stream", "enoutput": True}})
        work_id = setup["work_id"]
        for n in range(rounds):
            started = time.perf_counter()
            first = None
            c.send({"request_id": f"b{n}", "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
                    "data": {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "logit_bias": bias}})
            while True:
                data = c.read_for(f"b{n}")["data"]
                if first is None and data.get("delta"):
                    first = time.perf_counter()
                if data.get("finish"):
                    break
            end = time.perf_counter()
            out.append(measure(started, first, end, data["usage"]["completion_tokens"]))
        c.request({"request_id": "x", "work_id": work_id, "action": "exit"})
    return out


def best(rows: list[dict]) -> dict:
    return {"ttft_ms": min(r["ttft_ms"] for r in rows), "decode_tps": max(r["decode_tps"] for r in rows),
            "e2e_tps": max(r["e2e_tps"] for r in rows), "tokens": rows[0]["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the engine and of the unit")
    args = parser.parse_args()

    engine, bias = load_engine(args.threads)

    import httpx
    from support import Stack, free_port

    ports = {"openai": free_port(), "ollama": free_port()}
    settings = {"up.http": "true", "http.ai00.enabled": "false", "http.cortex.enabled": "false",
                **{f"http.{api}.port": str(port) for api, port in ports.items()}}
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-http-")), ["llm"], settings,
                  env={"UNITBUS_THREADS": str(args.threads)}).start()
    rows: dict[str, list[dict]] = {"engine alone": [], "openai stream (HTTP)": [], "ollama stream (HTTP)": [],
                                   "stackflow TCP": []}
    try:
        base = {api: f"http://127.0.0.1:{port}" for api, port in ports.items()}
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base["openai"] + "/livez").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        openai_side(base["openai"], 4, 1, bias)  # load the model: not part of the measurement
        for _ in range(args.rounds):
            rows["engine alone"] += engine_side(engine, args.tokens, 1)
            rows["openai stream (HTTP)"] += openai_side(base["openai"], args.tokens, 1, bias)
            rows["ollama stream (HTTP)"] += ollama_side(base["ollama"], args.tokens, 1, bias)
            rows["stackflow TCP"] += stackflow_side(stack.port, args.tokens, 1, bias)
    finally:
        stack.stop(check=False)
    results = {name: best(r) for name, r in rows.items()}

    ref = results["engine alone"]
    print(f"\nSmolLM2-135M Q4_1, {args.threads} onnxruntime threads, {args.tokens} new tokens, greedy, "
          f"best of {args.rounds}\n")
    print(f"{'side':<22}{'tokens':>7}{'TTFT ms':>10}{'x engine':>10}{'decode tok/s':>14}{'x engine':>10}"
          f"{'e2e tok/s':>11}{'x engine':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['tokens']:>7}{r['ttft_ms']:>10.1f}{r['ttft_ms'] / ref['ttft_ms']:>10.2f}"
              f"{r['decode_tps']:>14.1f}{r['decode_tps'] / ref['decode_tps']:>10.2f}"
              f"{r['e2e_tps']:>11.1f}{r['e2e_tps'] / ref['e2e_tps']:>10.2f}")


if __name__ == "__main__":
    main()
