"""The voice pipeline of spec §12.2 over TCP: kws -> asr -> llm -> tts, fed through the audio unit.

Nobody sends requests once the tasks are set up: a spoken "hey jarvis ... what is the capital of france"
goes in as microphone audio, and the chain outputs arrive on the owner's connection in pipeline order,
ending in speech on the speaker (WAV files in audio.play_dir) and, with enoutput, on the connection.
Then barge-in (§12.3): a wake while the board speaks stops the llm and the speaker.
"""
from __future__ import annotations

import base64
import time

import numpy as np
import pytest

from core import audio
from support import StackFlowClient
from voiceaudio import action, capture, outputs_until, setup

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def chain(c: StackFlowClient, max_tokens: int, prompt: str) -> tuple[str, str, str, str]:
    kws = setup(c, "kws", {"model": "openwakeword", "response_format": "kws.bool", "input": "sys.pcm",
                           "enoutput": True, "kws": "HEY JARVIS"}, "1")
    asr = setup(c, "asr", {"model": "whisper-tiny.en", "response_format": "asr.utf-8.stream",
                           "input": ["sys.pcm", kws["work_id"]], "enoutput": True}, "2")
    assert asr["error"]["code"] == 0, asr
    llm = setup(c, "llm", {"model": "smollm2-135m-instruct", "response_format": "llm.utf-8.stream",
                           "input": ["llm.utf-8", asr["work_id"], kws["work_id"]], "enoutput": True,
                           "max_token_len": max_tokens, "prompt": prompt, "temperature": 0}, "3", timeout=240)
    assert llm["error"]["code"] == 0, llm
    tts = setup(c, "melotts", {"model": "melotts-en-us", "response_format": "sys.pcm",
                               "input": ["tts.utf-8", llm["work_id"], kws["work_id"]], "enoutput": True}, "4")
    assert tts["error"]["code"] == 0 and tts["error"]["message"] == "model alias: melotts-en-us -> piper-en-us-joe-medium"
    return kws["work_id"], asr["work_id"], llm["work_id"], tts["work_id"]


def played(folder) -> list:
    return sorted(folder.glob("play-*.wav")) if folder.exists() else []


def test_spoken_question_to_spoken_answer(stack_factory, tmp_path, clips):
    play_dir = tmp_path / "play"
    stack = stack_factory(["audio", "kws", "asr", "llm", "tts"],
                          {"audio.capture": "push", "audio.play_dir": str(play_dir)}, timeout=120)
    with StackFlowClient(stack.port, timeout=120) as c:
        kws, asr, llm, tts = chain(c, 32, "You are a helpful assistant. Answer in one short sentence.")
        capture(c, clips["chain"])

        def answered(messages: list[dict]) -> bool:
            llm_done = any(m["work_id"] == llm and m["data"]["finish"] for m in messages)
            return llm_done and any(m["work_id"] == tts for m in messages)

        got = outputs_until(c, answered, 90)
        order = []
        for m in got:
            if m["work_id"] not in order:
                order.append(m["work_id"])
        assert order == [kws, asr, llm, tts]
        assert got[0]["object"] == "kws.bool" and got[0]["data"] is True
        transcript = [m for m in got if m["work_id"] == asr]
        assert transcript == [transcript[0]] and transcript[0]["data"] == {
            "delta": "what is the capital of france.", "finish": True, "index": 0}
        answer = "".join(m["data"]["delta"] for m in got if m["work_id"] == llm)
        assert "paris" in answer.lower()
        spoken = [m for m in got if m["work_id"] == tts]
        assert spoken[0]["object"] == "sys.pcm"
        returned = np.frombuffer(base64.b64decode(spoken[0]["data"]), dtype="<i2")
        assert returned.size > 16000 * 0.3
        # The same audio reached the speaker (the file grows as the answer plays, sentence after sentence).
        end = time.monotonic() + 10
        while time.monotonic() < end and (not played(play_dir) or
                                          audio.parse_wav(played(play_dir)[0].read_bytes()).size < returned.size):
            time.sleep(0.05)
        assert np.array_equal(audio.parse_wav(played(play_dir)[0].read_bytes())[:returned.size], returned)
        for work_id in (tts, llm, asr, kws):
            assert action(c, work_id, "exit")["error"]["code"] == 0


def test_barge_in_stops_the_answer(stack_factory, tmp_path, clips):
    play_dir = tmp_path / "play"
    stack = stack_factory(["audio", "kws", "asr", "llm", "tts"],
                          {"audio.capture": "push", "audio.play_dir": str(play_dir)}, timeout=120)
    with StackFlowClient(stack.port, timeout=120) as c:
        kws, asr, llm, tts = chain(c, 400, "You are a storyteller. Always answer with a very long story.")
        capture(c, clips["story"])  # a question whose answer outlasts the first spoken sentence
        got = outputs_until(c, lambda m: any(x["work_id"] == tts for x in m), 90)
        assert not any(m["work_id"] == llm and m["data"]["finish"] for m in got), "the answer ended too soon"
        # The board is speaking: kws still hears the microphone, and the wake stops llm and tts.
        capture(c, clips["wake"], "again")
        rest = outputs_until(c, lambda m: any(x["work_id"] == kws for x in m), 30)
        llm_done = any(m["work_id"] == llm and m["data"]["finish"] for m in got + rest)
        if not llm_done:
            # The answer was still being generated at the wake: it must end within a few chunks.
            after = outputs_until(c, lambda m: any(x["work_id"] == llm and x["data"]["finish"] for x in m), 30)
            assert sum(1 for m in after if m["work_id"] == llm) <= 5, "the llm kept generating after the wake"
            rest += after
        tokens = sum(1 for m in got + rest if m["work_id"] == llm)
        assert tokens < 134  # stopped, or ended on its own, long before 400 tokens (3 tokens per chunk)
        files = len(played(play_dir))
        c.expect_silence(3.0)  # nothing more from tts once the wake cleared its text
        assert len(played(play_dir)) == files
        assert not any(m["work_id"] == asr for m in rest), "asr heard a question where none was asked"
        for work_id in (tts, llm, asr, kws):
            assert action(c, work_id, "exit")["error"]["code"] == 0
