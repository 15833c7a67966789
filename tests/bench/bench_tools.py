"""Tool-call round trip: an OpenAI chat request with tools (tool_choice naming one) until the parsed call is
in the answer, against the same generation unconstrained, both through a real stack (sys, llm unit,
gateway) and measured in the same run.

    python tests/bench/bench_tools.py [--rounds 5] [--threads 2]

The constrained side pays everything a tool request costs: the tools written into the prompt, the
grammar compiled from the tools' schemas (llguidance), every step masked, the answer parsed. The
unconstrained side sends the very same prompt (the tools already written into the messages, no `tools`
field) with the end tokens banned and max_tokens set to the call's token count, so both decode the same
number of tokens after the same prefill. The tool side gets the same ban (its grammar ends the call
without an end token), so both samplers do the same work per step. tok/s is completion tokens over the whole request (wall time);
best of --rounds, the sides taking turns within each round.
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
EVENT = {"name": "create_event", "description": "Put an event in the calendar",
         "parameters": {"type": "object", "required": ["title", "date", "start", "attendees", "notes"], "properties": {
             "title": {"type": "string", "maxLength": 40},
             "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
             "start": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"},
             "attendees": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 4},
             "notes": {"type": "string", "minLength": 60, "maxLength": 240}}}}
LIGHT = {"name": "turn_on_light", "description": "Turn on the light in a room",
         "parameters": {"type": "object", "properties": {"room": {"type": "string"}}, "required": ["room"]}}
TOOLS = [{"type": "function", "function": EVENT}, {"type": "function", "function": LIGHT}]
CHOICE = {"type": "function", "function": {"name": "create_event"}}  # SmolLM2-135M picks the light otherwise
MESSAGES = [{"role": "user", "content": "Plan a team dinner with Ana and Bo next Friday at 7 pm, with notes on what "
                                        "to bring."}]


def timed(client, **body) -> tuple[float, object]:
    started = time.perf_counter()
    answer = client.post("/v1/chat/completions", json={"model": MODEL, "temperature": 0, **body})
    elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        raise SystemExit(f"HTTP {answer.status_code}: {answer.text}")
    return elapsed, answer.json()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the unit")
    args = parser.parse_args()

    import httpx

    from core.chat_template import tool_messages
    from models.gguf_llama import convert_manifest
    from support import Stack, free_port
    from units.llm.tools import tool_request

    manifest = json.loads(MANIFEST.read_text())
    config = json.loads((convert_manifest(manifest, progress=False) / "config.json").read_text())
    ban = {str(i): -100 for i in config["stop_ids"]}
    # The prompt a tool request renders, as plain messages: the chat template then gives the same text.
    plain = tool_messages(MESSAGES, tool_request(TOOLS, CHOICE, False).tools, config.get("default_system"))

    port = free_port()
    settings = {"up.http": "true", "http.ollama.enabled": "false", "http.ai00.enabled": "false",
                "http.cortex.enabled": "false", "http.openai.port": str(port)}
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-tools-")), ["llm"], settings,
                  env={"UNITBUS_THREADS": str(args.threads)}).start()
    rows: dict[str, list[tuple[float, int]]] = {"tools (constrained)": [], "unconstrained": []}
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/livez").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        timed(client, messages=MESSAGES, max_tokens=4)  # load the model: not part of the measurement
        call = None
        for _ in range(args.rounds + 1):
            elapsed, answer = timed(client, messages=MESSAGES, tools=TOOLS, tool_choice=CHOICE,
                                    parallel_tool_calls=False, max_tokens=400, logit_bias=ban)
            call = answer["choices"][0]["message"]["tool_calls"][0]["function"]
            tokens = answer["usage"]["completion_tokens"]
            rows["tools (constrained)"].append((elapsed, tokens))
            elapsed, answer = timed(client, messages=plain, max_tokens=tokens, logit_bias=ban,
                                    repetition_penalty=1.0)  # the tool request's penalty (units/llm/unit.py)
            rows["unconstrained"].append((elapsed, answer["usage"]["completion_tokens"]))
    finally:
        stack.stop(check=False)

    best = {name: max((tokens / elapsed, elapsed, tokens) for elapsed, tokens in r[1:]) for name, r in rows.items()}
    ref = best["unconstrained"][0]
    print(f"\nSmolLM2-135M Q4_1, {args.threads} onnxruntime threads, OpenAI /v1/chat/completions, greedy, "
          f"best of {args.rounds}\ncall: {call['name']}({call['arguments']})\n")
    print(f"{'side':<22}{'tokens':>7}{'round trip s':>14}{'tok/s':>9}{'x unconstrained':>17}")
    for name, (tps, elapsed, tokens) in best.items():
        print(f"{name:<22}{tokens:>7}{elapsed:>14.3f}{tps:>9.1f}{tps / ref:>17.2f}")


if __name__ == "__main__":
    main()
