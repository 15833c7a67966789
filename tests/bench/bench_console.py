"""The web console's chat transport: tokens/s and time to first token seen through the console's WebSocket
and in the page itself (Chromium), against a streaming OpenAI client on the same stack in the same run.

    python tests/bench/bench_console.py [--tokens 128] [--rounds 5]

Same body on every side (bench_http.py's prompt, greedy, end tokens biased by -100, so each side generates
--tokens tokens). Sides take turns within each round; best of --rounds:
- openai stream (HTTP): the `openai` client on /v1/chat/completions (the peer);
- console WebSocket: a `websockets` client speaking the page's protocol on /console/ws;
- console page: the console in headless Chromium, timed in the page from the Send click to the text on
  screen (first delta in the DOM, the final one marked done); without the bias, so it may stop sooner.
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
sys.path.insert(0, str(ROOT / "tests" / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "e2e" / "console"))

from bench_http import MESSAGES, MODEL, best, load_engine, measure, openai_side  # noqa: E402

PAGE_TIMER = """() => {
  window.bench = {};
  new MutationObserver(() => {
    const items = document.querySelectorAll('#messages li.assistant');
    const last = items[items.length - 1];
    if (!last) return;
    if (window.bench.first === undefined && last.querySelector('.content').textContent) window.bench.first = performance.now();
    if (last.dataset.finish && window.bench.end === undefined) window.bench.end = performance.now();
  }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def body(tokens: int, bias: dict) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "logit_bias": bias}


def socket_side(url: str, tokens: int, bias: dict) -> dict:
    from websockets.sync.client import connect

    with connect(url.replace("http://", "ws://") + "/console/ws", max_size=None) as ws:
        ws.send(json.dumps({"type": "hello", "key": ""}))
        json.loads(ws.recv())
        started = time.perf_counter()
        first = None
        ws.send(json.dumps({"type": "chat", "id": "b", "body": body(tokens, bias)}))
        while True:
            message = json.loads(ws.recv(timeout=300))
            if message["type"] == "token" and first is None:
                first = time.perf_counter()
            if message["type"] == "done":
                break
            if message["type"] == "error":
                raise RuntimeError(message["message"])
        end = time.perf_counter()
    return measure(started, first, end, message["usage"]["completion_tokens"])


def page_side(page, tokens: int) -> dict:
    """The page has no logit_bias field: its answer may end before --tokens (the tokens column says)."""
    page.get_by_role("button", name="New chat").click()
    page.get_by_label("System prompt").fill("")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(tokens))
    page.get_by_label("Message").fill(MESSAGES[0]["content"])
    page.evaluate(PAGE_TIMER)
    started = page.evaluate("() => { const t = performance.now(); document.querySelector('#chat-form').requestSubmit(); return t; }")
    page.wait_for_function("() => window.bench.end !== undefined", timeout=300_000)
    timing = page.evaluate("window.bench")
    count = int(page.locator("#messages li.assistant").last.get_attribute("data-completion-tokens"))
    first, end = timing["first"] / 1000, timing["end"] / 1000
    return measure(started / 1000, first, end, count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    engine, bias = load_engine(2)
    del engine

    from playwright.sync_api import sync_playwright

    from consolekit import CHROMIUM, CHROMIUM_ARGS, ConsoleStack

    console = ConsoleStack(Path(tempfile.mkdtemp(prefix="bench-console-")), ["llm"]).start()
    url = console.url.rstrip("/")
    rows: dict[str, list[dict]] = {"openai stream (HTTP)": [], "console WebSocket": [], "console page": []}
    try:
        openai_side(url, 4, 1, bias)  # load the model: not part of the measurement
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="bench-chromium-"),
                                                            executable_path=CHROMIUM, headless=True,
                                                            args=CHROMIUM_ARGS)
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(console.url)
            page.wait_for_selector("body[data-ready=true]")
            for _ in range(args.rounds):
                rows["openai stream (HTTP)"] += openai_side(url, args.tokens, 1, bias)
                rows["console WebSocket"].append(socket_side(url, args.tokens, bias))
                rows["console page"].append(page_side(page, args.tokens))
            context.close()
    finally:
        console.stop()
    results = {name: best(r) for name, r in rows.items()}
    ref = results["openai stream (HTTP)"]
    print(f"\nSmolLM2-135M Q4_1, {args.tokens} new tokens, greedy, best of {args.rounds}\n")
    print(f"{'side':<22}{'tokens':>7}{'TTFT ms':>10}{'x openai':>10}{'decode tok/s':>14}{'x openai':>10}"
          f"{'e2e tok/s':>11}{'x openai':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['tokens']:>7}{r['ttft_ms']:>10.1f}{r['ttft_ms'] / ref['ttft_ms']:>10.2f}"
              f"{r['decode_tps']:>14.1f}{r['decode_tps'] / ref['decode_tps']:>10.2f}"
              f"{r['e2e_tps']:>11.1f}{r['e2e_tps'] / ref['e2e_tps']:>10.2f}")


if __name__ == "__main__":
    main()
