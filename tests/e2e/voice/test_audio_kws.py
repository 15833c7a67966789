"""The audio unit (spec §16.7) and the kws unit (§16.4, §8.7) over TCP, with real openWakeWord."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from core import audio
from support import Stack, StackFlowClient
from voiceaudio import action, b64, capture, setup

pytestmark = [pytest.mark.e2e]

KWS = {"model": "openwakeword", "response_format": "kws.bool", "input": "sys.pcm", "enoutput": True,
       "kws": "HEY JARVIS"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio_kws")
    stack = Stack(tmp, ["audio", "kws"], {"audio.capture": "push", "audio.play_dir": str(tmp / "play"),
                                          "kws.max_tasks": "3"}).start()
    stack.play_dir = tmp / "play"
    yield stack
    stack.stop()


def played(folder, count: int, timeout: float = 10.0) -> list[np.ndarray]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        files = sorted(folder.glob("play-*.wav")) if folder.exists() else []
        if len(files) >= count:
            return [audio.parse_wav(f.read_bytes()) for f in files]
        time.sleep(0.05)
    raise AssertionError(f"{count} played files expected in {folder}")


def test_audio_unit_actions(stack, clips):
    with StackFlowClient(stack.port) as c:
        ok = setup(c, "audio", {"capcard": 0, "capdevice": 0, "capVolume": 0.5, "playcard": 0, "playdevice": 1,
                                "playVolume": 1.0})
        assert ok["error"]["code"] == 0 and ok["work_id"] == "audio"
        stackflow_form = c.request({"request_id": "sf", "work_id": "audio", "action": "setup", "object": "audio.cap",
                                    "data": {"card": 0, "device": 0, "volume": 1.0}})
        assert stackflow_form["error"]["code"] == 0
        bad = setup(c, "audio", {"playVolume": 3}, "bad")
        assert bad["error"]["code"] == -22 and bad["work_id"] == "audio"
        assert setup(c, "audio", {"capcard": "x"}, "bad2")["error"]["code"] == -22
        for name in ("exit", "pause", "work", "unlink"):
            assert action(c, "audio", name)["error"]["code"] == -18
        assert action(c, "audio", "link", data="kws.1000")["error"]["code"] == -18
        # Nobody listens to sys.pcm yet: pushed audio is refused rather than heard by a later task.
        assert action(c, "audio", "capture", object="audio.pcm.base64", data=b64(clips["wake"]))["error"]["code"] == -10
        info = action(c, "audio", "taskinfo")
        assert info["data"] == [] and info["object"] == "audio.tasklist"
        # Play a WAV and a streamed PCM: both reach the speaker (here: WAV files in audio.play_dir).
        tone = (np.sin(np.arange(4000) * 0.1) * 8000).astype(np.int16)
        assert action(c, "audio", "play", object="audio.wav.base64", data=b64(audio.to_wav(tone)))["error"]["code"] == 0
        text = b64(tone)
        c.send({"request_id": "ps", "work_id": "audio", "action": "play", "object": "audio.pcm.stream.base64",
                "data": {"delta": text[:400], "index": 0, "finish": False}})
        last = c.request({"request_id": "ps", "work_id": "audio", "action": "play", "object": "audio.pcm.stream.base64",
                          "data": {"delta": text[400:], "index": 1, "finish": True}})
        assert last["error"]["code"] == 0
        # Queued back to back they may play as one sound (one file) or two: the audio heard is the same.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(p.size for p in played(stack.play_dir, 1)) < 2 * tone.size:
            time.sleep(0.05)
        assert np.array_equal(np.concatenate(played(stack.play_dir, 1)), np.concatenate([tone, tone]))
        assert action(c, "audio", "play", "b64", object="audio.wav.base64", data="@@@")["error"]["code"] == -23
        assert action(c, "audio", "play", "mp3", object="audio.mp3.base64", data=b64(b"ID3abc"))["error"]["code"] == -37
        assert action(c, "audio", "play", "odd", object="audio.pcm.base64", data=b64(b"abc"))["error"]["code"] == -2


def test_kws_wakes_from_the_microphone_and_pause_stops_listening(stack, clips):
    with StackFlowClient(stack.port) as c:
        reply = setup(c, "kws", {**KWS, "kws": "hey jarvis"})
        assert reply["error"]["code"] == 0, reply
        work_id = reply["work_id"]
        info = action(c, work_id, "taskinfo")["data"]
        assert info["inputs"] == ["sys.pcm"] and info["response_format"] == "kws.bool"
        capture(c, clips["wake"])
        wake = c.read(timeout=10)
        assert (wake["work_id"], wake["object"], wake["data"], wake["request_id"]) == (work_id, "kws.bool", True, "setup")
        c.expect_silence(1.0)  # one wake per phrase
        assert action(c, work_id, "pause")["error"]["code"] == 0
        capture(c, clips["wake"], "c2")
        c.expect_silence(clips["wake"].size / 16000 + 0.5)
        assert action(c, work_id, "work")["error"]["code"] == 0
        capture(c, clips["wake"], "c3")
        assert c.read(timeout=10)["data"] is True
        assert action(c, work_id, "exit")["error"]["code"] == 0
        assert action(c, work_id, "exit", "again")["error"]["code"] == -6


def test_kws_client_audio_json_format_and_trigger(stack, clips):
    with StackFlowClient(stack.port) as c:
        reply = setup(c, "kws", {**KWS, "input": "kws.wav.base64", "response_format": "kws.json"})
        work_id = reply["work_id"]
        c.send({"request_id": "w", "work_id": work_id, "action": "inference", "object": "kws.wav.base64",
                "data": b64(audio.to_wav(clips["wake"]))})
        found = json.loads(c.read_for("w", timeout=20)["data"])
        assert found["keyword"] == "HEY JARVIS" and found["score"] >= 0.5
        # The wake word ends at spans[0][1]; the detection comes within 0.5 s of it.
        end_ms = clips["wake_spans"][0][1] * 1000
        assert end_ms - 200 <= found["timestamp_ms"] <= end_ms + 500
        # Speech without the wake word: no output at all.
        c.send({"request_id": "n", "work_id": work_id, "action": "inference", "object": "kws.pcm.base64",
                "data": b64(clips["lights"])})
        c.expect_silence(2.0)
        # RAW binary frame of PCM.
        raw = clips["wake"].astype("<i2").tobytes()
        c.send(json.dumps({"RAW": len(raw), "request_id": "raw", "work_id": work_id, "action": "inference",
                           "object": "kws.pcm.base64"}).encode() + raw)
        assert json.loads(c.read_for("raw", timeout=20)["data"])["keyword"] == "HEY JARVIS"
        trig = action(c, work_id, "trigger", "t")
        assert trig["error"]["code"] == 0 and trig["data"] == "None"
        forced = c.read_for("t")
        assert forced["object"] == "kws.json" and json.loads(forced["data"])["keyword"] == "HEY JARVIS"
        # Bad audio is an error reply, never a crash.
        for rid, obj, data, code in (("b1", "kws.pcm.base64", "!!notbase64", -23),
                                     ("b2", "kws.pcm.base64", b64(b"\x01\x02\x03"), -2),
                                     ("b3", "kws.wav.base64", b64(b"RIFF\x00\x00\x00\x00WAVE"), -2),
                                     ("b4", "kws.mp3.base64", b64(b"ID3\x00"), -37),
                                     ("b5", "kws.pcm.base64", "", -24)):
            answer = c.request({"request_id": rid, "work_id": work_id, "action": "inference", "object": obj, "data": data})
            assert answer["error"]["code"] == code, (rid, answer)
        assert action(c, work_id, "link", data="kws.1000")["error"]["code"] in (-20, -22)
        assert action(c, work_id, "exit")["error"]["code"] == 0


def test_kws_plays_the_wake_sound(stack, clips, tmp_path):
    chime = (np.sin(np.arange(3200) * 0.3) * 5000).astype(np.int16)
    (tmp_path / "chime.wav").write_bytes(audio.to_wav(chime))
    before = len(list(stack.play_dir.glob("play-*.wav")))
    with StackFlowClient(stack.port) as c:
        reply = setup(c, "kws", {**KWS, "wake_wav_file": str(tmp_path / "chime.wav")})
        assert reply["error"]["code"] == 0, reply
        capture(c, clips["wake"])
        assert c.read(timeout=10)["data"] is True
        sounds = played(stack.play_dir, before + 1)
        assert np.array_equal(sounds[-1], chime)
        action(c, reply["work_id"], "exit")
        missing = setup(c, "kws", {**KWS, "wake_wav_file": str(tmp_path / "none.wav")}, "m")
        assert missing["error"]["code"] == -5


def test_kws_keyword_substitution_and_strict(stack):
    with StackFlowClient(stack.port) as c:
        reply = setup(c, "kws", {**KWS, "kws": "HELLO", "input": "kws.pcm.base64"})
        assert reply["error"]["code"] == 0
        assert "HELLO" in reply["error"]["message"] and "HEY JARVIS" in reply["error"]["message"]
        action(c, reply["work_id"], "exit")
        strict = setup(c, "kws", {**KWS, "kws": "HELLO", "kws_strict": True, "input": "kws.pcm.base64"}, "s2")
        assert strict["error"]["code"] == -5 and strict["work_id"] == "kws"
        assert setup(c, "kws", {**KWS, "threshold": "high"}, "s3")["error"]["code"] == -2


def test_no_capture_source_refuses_microphone_tasks(tmp_path, clips):
    stack = Stack(tmp_path, ["audio", "kws"], {"audio.capture": "none"}).start()
    try:
        with StackFlowClient(stack.port) as c:
            refused = setup(c, "kws", KWS)
            assert refused["error"]["code"] == -8 and refused["work_id"] == "kws"
            # Client audio needs no microphone.
            assert setup(c, "kws", {**KWS, "input": "kws.pcm.base64"}, "s2")["error"]["code"] == 0
    finally:
        stack.stop()


def test_wav_folder_source_is_the_microphone(tmp_path, clips):
    folder = tmp_path / "mic"
    folder.mkdir()
    (folder / "1-quiet.wav").write_bytes(audio.to_wav(clips["silence"]))
    (folder / "2-wake.wav").write_bytes(audio.to_wav(clips["wake"]))
    (folder / "notes.txt").write_text("not audio")
    stack = Stack(tmp_path / "s", ["audio", "kws"], {"audio.source_wav": str(folder), "audio.loop": "true"}).start()
    try:
        with StackFlowClient(stack.port) as c:
            assert setup(c, "kws", KWS)["error"]["code"] == 0
            started = time.monotonic()
            assert c.read(timeout=15)["data"] is True
            # Paced in real time, files in name order: the wake word ends this far into the source.
            first = time.monotonic() - started
            lead = clips["silence"].size / 16000 + clips["wake_spans"][0][1]
            assert first >= lead - 0.3
            # audio.loop: the folder plays again, and so does the wake word, one loop later.
            assert c.read(timeout=15)["data"] is True
            loop_s = (clips["silence"].size + clips["wake"].size) / 16000
            assert time.monotonic() - started >= first + loop_s - 0.5
    finally:
        stack.stop()
