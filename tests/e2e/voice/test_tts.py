"""The tts/melotts unit over TCP (spec §16.6, §10.4, §10.5) with the real Piper voice."""
from __future__ import annotations

import base64
import time

import numpy as np
import pytest

from core import audio
from support import Stack, StackFlowClient
from voiceaudio import action, capture, outputs_until, setup

pytestmark = [pytest.mark.e2e]

TTS = {"model": "piper-en-us-joe-medium", "response_format": "tts.base64.wav", "input": "tts.utf-8", "enoutput": True}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tts")
    stack = Stack(tmp, ["audio", "tts", "asr"], {"audio.capture": "push", "audio.play_dir": str(tmp / "play"),
                                                 "tts.max_tasks": "2"}).start()
    stack.play_dir = tmp / "play"
    yield stack
    stack.stop()


def pcm_of(message: dict) -> np.ndarray:
    data = message["data"]
    text = data["delta"] if isinstance(data, dict) else data
    return np.frombuffer(base64.b64decode(text), dtype="<i2")


def transcribe(c: StackFlowClient, work_id: str, pcm: np.ndarray, request_id: str) -> str:
    pad = np.zeros(4800, np.int16)  # Piper starts speaking at the first sample; Whisper likes a lead-in
    reply = c.request({"request_id": request_id, "work_id": work_id, "action": "inference", "object": "asr.wav.base64",
                       "data": base64.b64encode(audio.to_wav(np.concatenate([pad, pcm, pad]))).decode()}, timeout=60)
    return reply["data"]


def test_text_to_returned_audio_sentence_by_sentence(stack):
    with StackFlowClient(stack.port, timeout=60) as c:
        reply = setup(c, "tts", TTS)
        assert reply["error"]["code"] == 0, reply
        work_id = reply["work_id"]
        asr = setup(c, "asr", {"model": "whisper-tiny.en", "input": "asr.wav.base64",
                               "response_format": "asr.utf-8"}, "asr")["work_id"]
        c.send({"request_id": "t", "work_id": work_id, "action": "inference", "object": "tts.utf-8",
                "data": "Turn on the kitchen lights. What time is it?"})
        first, second = c.read_for("t"), c.read_for("t")  # one message per sentence (non-stream format)
        assert first["object"] == second["object"] == "tts.base64.wav"
        pcm = [pcm_of(first), pcm_of(second)]
        assert all(16000 * 0.5 < p.size < 16000 * 4 for p in pcm)  # raw 16 kHz PCM, no WAV header
        assert "kitchen lights" in transcribe(c, asr, pcm[0], "r1")
        assert "what time is it" in transcribe(c, asr, pcm[1], "r2")
        c.expect_silence(0.5)
        assert c.request({"request_id": "e", "work_id": work_id, "action": "inference", "object": "tts.utf-8",
                          "data": "   "})["error"]["code"] == -24
        assert c.request({"request_id": "b", "work_id": work_id, "action": "inference", "object": "tts.pcm.base64",
                          "data": "aGVsbG8="})["error"]["code"] == -37
        for work in (work_id, asr):
            assert action(c, work, "exit")["error"]["code"] == 0


def test_stream_in_stream_out_and_audio_rate(stack):
    with StackFlowClient(stack.port, timeout=60) as c:
        work_id = setup(c, "melotts", {**TTS, "model": "melotts-en-us", "response_format": "pcm.stream.base64",
                                       "input": "tts.utf-8.stream", "audio_rate": 8000})["work_id"]
        assert work_id.startswith("melotts.")
        pieces = ["Good morn", "ing everyone. How", " are you", " today"]
        for index, delta in enumerate(pieces):
            c.send({"request_id": "s", "work_id": work_id, "action": "inference", "object": "tts.utf-8.stream",
                    "data": {"delta": delta, "index": index, "finish": index == len(pieces) - 1}})
        chunks = outputs_until(c, lambda m: bool(m) and m[-1]["data"]["finish"], 60)
        assert [m["data"]["index"] for m in chunks] == list(range(len(chunks)))  # one numbering per response
        # Two sentences (each sentence's first audio in growing chunks, out before its end), then the end.
        assert len(chunks) >= 3 and chunks[-1]["data"]["delta"] == ""
        assert all(m["object"] == "pcm.stream.base64" and m["request_id"] == "s" for m in chunks)
        # audio_rate 8000: half the samples of the same speech at 16 kHz (2-4 s of it).
        assert 8000 * 1.5 < sum(pcm_of(m).size for m in chunks[:-1]) < 8000 * 5
        assert action(c, work_id, "exit")["error"]["code"] == 0


def test_speaker_output_pause_and_bad_setup(stack):
    with StackFlowClient(stack.port, timeout=60) as c:
        reply = setup(c, "tts", {**TTS, "response_format": "sys.pcm", "enoutput": False})
        work_id = reply["work_id"]
        c.send({"request_id": "p", "work_id": work_id, "action": "inference", "object": "tts.utf-8",
                "data": "Turn on the kitchen lights."})
        c.expect_silence(1.0)  # enoutput false: the speaker gets it, the client nothing
        end = time.monotonic() + 20  # the file grows while the sentence plays
        while time.monotonic() < end and sum(audio.parse_wav(f.read_bytes()).size
                                             for f in stack.play_dir.glob("play-*.wav")) < 16000 * 1.0:
            time.sleep(0.05)
        files = sorted(stack.play_dir.glob("play-*.wav"))
        assert len(files) == 1 and audio.parse_wav(files[0].read_bytes()).size > 16000 * 1.0
        assert action(c, work_id, "pause")["error"]["code"] == 0
        assert action(c, work_id, "work")["error"]["code"] == 0
        assert setup(c, "tts", {**TTS, "spacker_speed": 99.0}, "bad")["error"]["code"] == -2
        assert setup(c, "melotts", {**TTS, "model": "melotts-zh-cn"}, "zh")["error"]["code"] == -5
        assert action(c, work_id, "exit")["error"]["code"] == 0


def test_asr_does_not_hear_the_board_speaking(stack, clips):
    with StackFlowClient(stack.port, timeout=60) as c:
        asr = setup(c, "asr", {"model": "whisper-tiny.en", "input": "sys.pcm", "response_format": "asr.utf-8",
                               "rule2": 0.8}, "a")
        assert asr["error"]["code"] == 0, asr
        tts = setup(c, "tts", {**TTS, "response_format": "sys.pcm", "enoutput": False}, "t")["work_id"]
        before = len(list(stack.play_dir.glob("play-*.wav")))
        c.send({"request_id": "say", "work_id": tts, "action": "inference", "object": "tts.utf-8",
                "data": "This is a rather long sentence that keeps the speaker busy for quite a few seconds, "
                        "long enough for the microphone test to finish while it is still being played."})
        end = time.monotonic() + 20
        while time.monotonic() < end and len(list(stack.play_dir.glob("play-*.wav"))) == before:
            time.sleep(0.02)
        # While the board speaks, microphone audio is withheld from asr (audio.mute_capture_while_playing).
        capture(c, clips["lights"])
        c.expect_silence(clips["lights"].size / 16000 + 1.5)
        assert action(c, tts, "pause")["error"]["code"] == 0  # stops the speaker
        capture(c, clips["lights"], "c2")
        assert c.read(timeout=30)["data"] == "turn on the kitchen lights."
        for work_id in (tts, asr["work_id"]):
            assert action(c, work_id, "exit")["error"]["code"] == 0
