"""The asr/whisper unit (spec §16.2, §16.3, §10.3) and the vad unit (§16.5) over TCP, real models."""
from __future__ import annotations

import json
import time

import pytest

from core import audio
from support import Stack, StackFlowClient
from voiceaudio import action, b64, capture, outputs_until, setup

pytestmark = [pytest.mark.e2e]

ASR = {"model": "whisper-tiny.en", "response_format": "asr.utf-8.stream", "input": "sys.pcm", "enoutput": True}
VAD = {"model": "silero-vad", "response_format": "vad.bool", "input": "sys.pcm", "enoutput": True}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("asr_vad")
    stack = Stack(tmp, ["audio", "kws", "asr", "vad"],
                  {"audio.capture": "push", "asr.max_tasks": "2", "vad.max_tasks": "2"}).start()
    yield stack
    stack.stop()



def test_whisper_alias_client_audio(stack, clips):
    with StackFlowClient(stack.port, timeout=60) as c:
        reply = setup(c, "whisper", {"model": "whisper-tiny", "input": "whisper.base64", "language": "en"})
        assert reply["error"]["code"] == 0 and reply["work_id"].startswith("whisper.")
        assert reply["error"]["message"] == "model alias: whisper-tiny -> whisper-tiny.en"
        work_id = reply["work_id"]
        assert action(c, work_id, "taskinfo")["data"]["response_format"] == "asr.utf-8"  # whisper's default
        # asr.base64 holding a WAV (the OpenAI plugin's form) to a whisper task.
        out = c.request({"request_id": "w", "work_id": work_id, "action": "inference", "object": "asr.base64",
                         "data": b64(audio.to_wav(clips["lights"]))}, timeout=60)
        assert out["object"] == "asr.utf-8" and out["data"] == "turn on the kitchen lights."
        # Streamed WAV in chunks, joined at finish:true.
        text = b64(audio.to_wav(clips["question"]))
        c.send({"request_id": "s", "work_id": work_id, "action": "inference", "object": "whisper.wav.stream.base64",
                "data": {"delta": text[:1000], "index": 0, "finish": False}})
        c.send({"request_id": "s", "work_id": work_id, "action": "inference", "object": "whisper.wav.stream.base64",
                "data": {"delta": text[1000:], "index": 1, "finish": True}})
        assert c.read_for("s", timeout=60)["data"] == "what is the capital of france."
        # Bad audio: error codes, and the task keeps working.
        for rid, obj, data, code in (("b1", "asr.pcm.base64", "%%%", -23), ("b2", "asr.pcm.base64", b64(b"\x00"), -2),
                                     ("b3", "asr.wav.base64", b64(b"RIFFxxxxWAVEfmt "), -2),
                                     ("b4", "asr.mp3.base64", b64(b"ID3"), -37)):
            answer = c.request({"request_id": rid, "work_id": work_id, "action": "inference", "object": obj, "data": data})
            assert answer["error"]["code"] == code, (rid, answer)
        raw = clips["lights"].astype("<i2").tobytes()
        c.send(json.dumps({"RAW": len(raw), "request_id": "raw", "work_id": work_id, "action": "inference",
                           "object": "asr.pcm.base64"}).encode() + raw)
        assert c.read_for("raw", timeout=60)["data"] == "turn on the kitchen lights."
        assert action(c, work_id, "exit")["error"]["code"] == 0


def test_asr_microphone_endpointing_and_pause(stack, clips):
    with StackFlowClient(stack.port, timeout=60) as c:
        reply = setup(c, "asr", {**ASR, "rule2": 0.8})
        work_id = reply["work_id"]
        assert reply["error"]["code"] == 0, reply
        capture(c, clips["question"])
        started = time.monotonic()
        out = c.read(timeout=30)
        assert out["work_id"] == work_id and out["object"] == "asr.utf-8.stream"
        assert out["data"] == {"delta": "what is the capital of france.", "finish": True, "index": 0}
        # rule2 (0.8 s of trailing silence) ends the utterance: not before the speech ends plus 0.8 s.
        assert time.monotonic() - started >= clips["question_spans"][0][1] + 0.7
        assert action(c, work_id, "pause")["error"]["code"] == 0
        capture(c, clips["lights"], "c2")
        c.expect_silence(clips["lights"].size / 16000 + 1.5)
        assert action(c, work_id, "work")["error"]["code"] == 0
        capture(c, clips["lights"], "c3")
        again = c.read(timeout=30)["data"]
        assert again["delta"] == "turn on the kitchen lights." and again["index"] == 0  # a new utterance starts at index 0
        assert action(c, work_id, "exit")["error"]["code"] == 0


def test_asr_listens_only_after_a_wake(stack, clips):
    with StackFlowClient(stack.port, timeout=60) as c:
        kws = setup(c, "kws", {"model": "openwakeword", "response_format": "kws.bool", "input": "sys.pcm",
                               "enoutput": True, "kws": "HEY JARVIS"}, "k")["work_id"]
        reply = setup(c, "asr", {**ASR, "input": ["sys.pcm", kws], "rule2": 0.8}, "a")
        assert reply["error"]["code"] == 0, reply
        asr = reply["work_id"]
        # Asleep: a question without the wake word is not transcribed.
        capture(c, clips["question"])
        c.expect_silence(clips["question"].size / 16000 + 1.0)
        capture(c, clips["chain"], "c2")
        got = outputs_until(c, lambda m: any(x["work_id"] == asr for x in m), 40)
        assert [m["work_id"] for m in got] == [kws, asr]
        assert got[1]["data"]["delta"] == "what is the capital of france."
        # One utterance per wake: asleep again.
        capture(c, clips["lights"], "c3")
        c.expect_silence(clips["lights"].size / 16000 + 1.5)
        for work_id in (asr, kws):
            assert action(c, work_id, "exit")["error"]["code"] == 0


def test_vad_microphone_and_client_audio(stack, clips):
    with StackFlowClient(stack.port, timeout=60) as c:
        reply = setup(c, "vad", VAD)
        assert reply["error"]["code"] == 0, reply
        work_id = reply["work_id"]
        capture(c, clips["lights"])
        onset, end = c.read(timeout=10), c.read(timeout=10)
        assert (onset["object"], onset["data"], end["data"]) == ("vad.bool", True, False)
        assert action(c, work_id, "pause")["error"]["code"] == 0
        capture(c, clips["lights"], "c2")
        c.expect_silence(clips["lights"].size / 16000 + 0.8)
        assert action(c, work_id, "work")["error"]["code"] == 0
        c.send({"request_id": "clip", "work_id": work_id, "action": "inference", "object": "vad.wav.base64",
                "data": b64(audio.to_wav(clips["chain"]))})
        events = outputs_until(c, lambda m: len(m) >= 4, 20)
        assert [m["data"] for m in events] == [True, False, True, False]  # two phrases
        assert all(m["request_id"] == "clip" for m in events)
        bad = c.request({"request_id": "bad", "work_id": work_id, "action": "inference", "object": "vad.pcm.base64",
                         "data": b64(b"\x00\x01\x02")})
        assert bad["error"]["code"] == -2
        refused = setup(c, "vad", {**VAD, "silero_vad.window_size": 256}, "s2")
        assert refused["error"]["code"] == -5
        assert action(c, work_id, "exit")["error"]["code"] == 0


def test_whisper_transcribes_when_a_linked_vad_says_false(stack, clips):
    with StackFlowClient(stack.port, timeout=60) as c:
        vad = setup(c, "vad", {**VAD, "silero_vad.min_silence_duration": 0.3}, "v")["work_id"]
        # rule2 at 6 s: without vad, the utterance would end 6 s after the speech.
        reply = setup(c, "whisper", {"model": "whisper-tiny", "input": ["sys.pcm", vad], "rule2": 6.0}, "w")
        assert reply["error"]["code"] == 0, reply
        whisper = reply["work_id"]
        capture(c, clips["question"])
        started = time.monotonic()
        got = outputs_until(c, lambda m: any(x["work_id"] == whisper for x in m), 30)
        elapsed = time.monotonic() - started
        assert [m["data"] for m in got] == [True, False, "what is the capital of france."]
        assert got[-1]["object"] == "asr.utf-8"
        assert elapsed < clips["question_spans"][0][1] + 6.0  # before rule2 could have ended it
        for work_id in (whisper, vad):
            assert action(c, work_id, "exit")["error"]["code"] == 0


def test_vad_after_a_wake_reports_one_segment(stack, clips):
    with StackFlowClient(stack.port, timeout=60) as c:
        kws = setup(c, "kws", {"model": "openwakeword", "response_format": "kws.bool", "input": "sys.pcm",
                               "enoutput": True}, "k")["work_id"]
        reply = setup(c, "vad", {**VAD, "input": ["sys.pcm", kws]}, "v")
        assert reply["error"]["code"] == 0, reply
        vad = reply["work_id"]
        capture(c, clips["lights"])  # asleep: no events
        c.expect_silence(clips["lights"].size / 16000 + 0.8)
        capture(c, clips["chain"], "c2")
        got = outputs_until(c, lambda m: sum(x["work_id"] == vad for x in m) >= 2, 20)
        assert [(m["work_id"], m["data"]) for m in got] == [(kws, True), (vad, True), (vad, False)]
        capture(c, clips["lights"], "c3")  # asleep again after one segment
        c.expect_silence(clips["lights"].size / 16000 + 0.8)
        for work_id in (vad, kws):
            assert action(c, work_id, "exit")["error"]["code"] == 0
