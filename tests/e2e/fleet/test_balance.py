"""The OpenAI gateway of one board spreads chats over every board serving the model (protocol.md §21.5)."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

from fleet_support import MODEL, fleet_stats

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SUBJECT = "unitbus.model." + MODEL


def accepted(stats: dict) -> dict[str, int]:
    return {board: endpoints.get(SUBJECT, {}).get("accepted", 0) for board, endpoints in stats.items()}


def test_eight_streams_over_two_boards(two_boards, nats_server):
    a, _ = two_boards
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{a.settings['http.openai.port']}/v1",
                                api_key="unused", timeout=180, max_retries=0)

    async def chat(n: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count from {n} to {n + 5}."}], stream=True,
            max_tokens=16, temperature=0)
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run():
        before = accepted(await fleet_stats(nats_server.url))
        results = await asyncio.gather(*(chat(n) for n in range(8)))
        after = accepted(await fleet_stats(nats_server.url))
        return results, {b: after[b] - before.get(b, 0) for b in after}

    results, taken = asyncio.run(run())
    assert all(text.strip() and finish in ("stop", "length") for text, finish in results), results
    assert sum(taken.values()) == 8 and taken["alpha"] > 0 and taken["beta"] > 0, (taken, a.log()[-3000:])


def test_client_disconnect_cancels_the_remote_generation(two_boards):
    a, b = two_boards
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.settings['http.openai.port']}/v1",
                           api_key="unused", timeout=180, max_retries=0)
    marks = (len(a.output), len(b.output))
    stream = client.chat.completions.create(model=MODEL, stream=True, max_tokens=2000, temperature=0,
                                            messages=[{"role": "user", "content": "Write a very long story."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while True:
        new = a.output[marks[0]:] + b.output[marks[1]:]
        if any(" fleet INFO firmware_bridge.pool" in line and "client gone, cancelling" in line for line in new):
            break  # the board that ran it stopped its own task's generation
        assert time.monotonic() < deadline, "".join(new)[-3000:]
        time.sleep(0.1)


def test_a_board_without_the_llm_unit_hands_requests_on(two_boards, nats_server, tmp_path):
    """gamma has the model's manifest but runs no llm unit: what NATS gives it goes on to alpha or beta."""
    from fleet_support import board, wait_joined
    from support import StackFlowClient

    a, _ = two_boards
    gamma = board(tmp_path, "gamma", nats_server.url, units=("skel",)).start()
    try:
        wait_joined(a, "alpha", "beta", "gamma")
        with StackFlowClient(a.port, timeout=60) as c:
            # NATS picks a board at random: until gamma has been offered one (each time 1 in 3), ask again.
            for n in range(30):
                c.send({"request_id": f"g{n}", "work_id": "llm@*", "action": "inference", "object": "llm.utf-8",
                        "data": {"model": MODEL, "input": "Name a color.", "setup": {"max_token_len": 8}}})
                chunks = c.stream(f"g{n}")
                assert all(m["error"]["code"] == 0 for m in chunks), chunks
                assert not chunks[0]["work_id"].endswith("@gamma"), chunks
                stats = asyncio.run(fleet_stats(nats_server.url))
                if n >= 5 and stats["gamma"][SUBJECT]["busy"]:
                    break
        assert stats["gamma"][SUBJECT]["accepted"] == 0, stats["gamma"]
        assert stats["gamma"][SUBJECT]["busy"] > 0, stats["gamma"]  # it was offered some and handed them on
    finally:
        assert gamma.stop(check=False) == 0
