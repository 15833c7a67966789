"""Hands-free in the console: the board's own kws -> asr -> llm -> tts chain, each event shown live.

The board's microphone is the audio unit in push mode: the test pushes "hey jarvis ... what is the capital
of france" into it over TCP, as a microphone would hear it; the speaker is audio.play_dir.
"""
from __future__ import annotations

import base64
import time

import httpx
import numpy as np
import pytest

from consolekit import ConsoleStack, open_console, screenshot
from support import StackFlowClient, espeak_pcm, espeak_wav, trim_silence

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE = 16000


def spoken_scene(folder) -> np.ndarray:
    wake = trim_silence(espeak_pcm("hey jarvis", folder))
    question = trim_silence(espeak_pcm("what is the capital of france", folder))
    silence = lambda s: np.zeros(int(s * RATE), np.int16)  # noqa: E731
    pcm = np.concatenate([silence(0.5), wake, silence(1.0), question, silence(2.0)]).astype(np.float64)
    pcm += np.random.default_rng(0).normal(0.0, 30.0, pcm.size)  # a quiet room, not digital silence
    return np.clip(np.rint(pcm), -32768, 32767).astype(np.int16)


def test_handsfree_chain_events_live(tmp_path, browser):
    play_dir = tmp_path / "play"
    console = ConsoleStack(tmp_path / "stack", ["audio", "kws", "asr", "llm", "tts"],
                           {"audio.capture": "push", "audio.play_dir": str(play_dir)}).start()
    try:
        # Speech already used through the gateway: its idle asr and tts tasks hold the units' only task.
        wav = espeak_wav("hello there", tmp_path / "hello.wav").read_bytes()
        r = httpx.post(console.url + "v1/audio/transcriptions", files={"file": ("hello.wav", wav, "audio/wav")},
                       timeout=120)
        assert r.status_code == 200 and "hello" in r.json()["text"].lower(), r.text
        assert httpx.post(console.url + "v1/audio/speech", json={"input": "Hello."}, timeout=120).status_code == 200
        page = open_console(browser(), console)
        page.get_by_label("Temperature").fill("0")
        page.get_by_label("System prompt").fill("You are a helpful assistant. Answer in one short sentence.")
        page.get_by_role("tab", name="Voice").click()
        page.get_by_role("button", name="Start hands-free").click()
        events = page.locator("#hf-events")
        events.locator("li.error").or_(events.get_by_text("listening (")).first.wait_for(timeout=240_000)
        assert events.locator("li.error").count() == 0, events.inner_text()
        tasks = events.get_by_text("listening (").inner_text()
        assert all(f"{unit}." in tasks for unit in ("kws", "asr", "llm", "tts"))
        with StackFlowClient(console.stack.port, timeout=60) as tcp:
            pcm = spoken_scene(tmp_path).astype("<i2").tobytes()
            reply = tcp.request({"request_id": "mic", "work_id": "audio", "action": "capture",
                                 "object": "audio.pcm.base64", "data": base64.b64encode(pcm).decode()})
            assert reply["error"]["code"] == 0, reply
        events.locator("li[data-object='kws.bool']").first.wait_for(timeout=60_000)
        assert events.locator("li[data-object='kws.bool']").first.inner_text().endswith("true")
        heard = events.locator("li[data-object='asr.utf-8.stream']", has_text="capital of france")
        heard.first.wait_for(timeout=60_000)
        answer = events.locator("li", has_text="Paris")
        answer.first.wait_for(timeout=90_000)
        assert answer.first.inner_text().startswith("llm.")
        # The answer was spoken on the board's speaker.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(play_dir.glob("play-*.wav")):
            time.sleep(0.2)
        assert list(play_dir.glob("play-*.wav"))
        screenshot(page, "handsfree")
        page.get_by_role("button", name="Stop hands-free").click()
        events.get_by_text("stopped").wait_for(timeout=30_000)
        with StackFlowClient(console.stack.port) as tcp:
            assert tcp.request({"request_id": "l", "work_id": "sys", "action": "lstask"})["data"] == []
    finally:
        console.stop()
