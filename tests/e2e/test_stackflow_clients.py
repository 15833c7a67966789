"""What unmodified StackFlow clients do, against real stacks and real models (spec §4.3, §7.4, §8.6,
§10.1, §16.6, §17.5): fresh request_ids per stream chunk, OpenAI voice names, StackFlow model names,
task slots shared by alias names, sys.reset restarting the units, brace counting on the UART."""
from __future__ import annotations

import base64
import json
import re
import time
import uuid

import numpy as np
import pytest
import serial

from core import audio
from support import Stack, StackFlowClient, espeak_pcm, word_edit_distance

pytestmark = pytest.mark.e2e

# StackFlow's model names for the languages unitbus serves (m5stack/StackFlow, projects/llm_framework/
# main_*/**/mode_*.json, January 2026), by the unit that serves them.
STACKFLOW_NAMES = {
    "llm": ["qwen2.5-0.5B-prefill-20e", "qwen2.5-0.5B-Int4-ax630c", "qwen2.5-0.5B-Int4-ax650", "qwen2.5-0.5B-p256-ax630c",
            "qwen2.5-1.5B-ax630c", "qwen2.5-1.5B-p256-ax630c", "qwen2.5-1.5B-Int4-ax630c", "qwen2.5-1.5B-Int4-ax650",
            "qwen2.5-3B-Int4-ax650", "qwen2.5-7B-Int4-ax650", "qwen2.5-HA-0.5B-ctx-ax630c", "qwen2.5-HA-0.5B-ctx-ax650",
            "qwen2.5-coder-0.5B-ax630c", "qwen3-0.6B-ax630c", "llama3.2-1B-prefill-ax630c", "llama3.2-1B-p256-ax630c",
            "openbuddy-llama3.2-1B-ax630c", "deepseek-r1-1.5B-ax630c", "deepseek-r1-1.5B-p256-ax630c",
            "deepseek-r1-1.5B-Int4-ax650", "deepseek-r1-7B-Int4-ax650"],
    "asr": ["sherpa-ncnn-streaming-zipformer-20M-2023-02-17", "sherpa-onnx-streaming-zipformer-small-bilingual-zh-en-2023-02-16",
            "sherpa-onnx-streaming-zipformer-small-bilingual-zh-en-2023-02-16-ax650", "sense-voice-small-10s-ax650"],
    "whisper": ["whisper-tiny", "whisper-base", "whisper-small", "whisper-tiny-ax650", "whisper-base-ax650",
                "whisper-small-ax650"],
    "kws": ["kws", "kws-ax650", "sherpa-onnx-kws-zipformer-gigaspeech-3.3M-2024-01-01"],
    "melotts": ["melotts-en-us", "melotts-en-default", "melotts-en-au", "melotts-en-br", "melotts-en-india",
                "melotts-en-us-ax650", "melotts-en-default-ax650", "melotts-en-au-ax650", "melotts-en-br-ax650",
                "melotts-en-india-ax650", "melotts_en-us"],
    "tts": ["single-speaker-english-fast", "single_speaker_english_fast"],
    "vad": ["silero-vad"],
}
SETUP = {
    "llm": {"response_format": "llm.utf-8.stream", "input": "llm.utf-8", "enoutput": True},
    "asr": {"response_format": "asr.utf-8", "input": "asr.base64", "enoutput": True},
    "whisper": {"response_format": "asr.utf-8", "input": "whisper.base64", "enoutput": True},
    "kws": {"response_format": "kws.bool", "input": "kws.pcm.base64", "enoutput": True, "kws": "HEY JARVIS"},
    "melotts": {"response_format": "tts.base64.wav", "input": "tts.utf-8", "enoutput": True},
    "tts": {"response_format": "tts.base64.wav", "input": "tts.utf-8", "enoutput": True},
    "vad": {"response_format": "vad.bool", "input": "vad.pcm.base64", "enoutput": True},
}


def setup(c: StackFlowClient, unit: str, data: dict, request_id: str = "setup") -> dict:
    return c.request({"request_id": request_id, "work_id": unit, "action": "setup", "object": f"{unit}.setup",
                      "data": data}, timeout=180)


def exit_task(c: StackFlowClient, work_id: str) -> None:
    assert c.request({"request_id": "exit", "work_id": work_id, "action": "exit"})["error"]["code"] == 0


def fresh_id() -> str:
    return str(uuid.uuid4())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture(scope="module")
def voice_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("clients"), ["llm", "asr", "kws", "vad", "tts", "audio"],
                  {"audio.capture": "push"}).start(180)
    yield stack
    stack.stop()


def test_asr_stream_with_a_fresh_request_id_per_chunk(voice_stack, tmp_path):
    """The OpenAI plugin's transcription route: a WAV in base64, each chunk with a new uuid."""
    pcm = espeak_pcm("turn on the kitchen lights", tmp_path)  # with its lead-in: Whisper drops a first word cut hard
    text = base64.b64encode(audio.to_wav(pcm)).decode("ascii")
    with StackFlowClient(voice_stack.port, timeout=60) as c:
        reply = setup(c, "whisper", {"model": "whisper-tiny", **SETUP["whisper"], "language": "en"})
        assert reply["error"]["code"] == 0, reply
        work_id = reply["work_id"]
        pieces = [text[i:i + 4096] for i in range(0, len(text), 4096)]
        assert len(pieces) > 3
        ids = [fresh_id() for _ in pieces]
        for index, (piece, request_id) in enumerate(zip(pieces, ids)):
            c.send({"request_id": request_id, "work_id": work_id, "action": "inference",
                    "object": "asr.base64.wav.stream",
                    "data": {"delta": piece, "index": index, "finish": index == len(pieces) - 1}})
        out = c.read(timeout=60)  # chunks before the last get no reply: the first message is the answer
        assert out["request_id"] == ids[-1] and out["error"]["code"] == 0, out
        assert out["data"] == "turn on the kitchen lights."
        c.expect_silence(1.0)
        exit_task(c, work_id)


def test_llm_stream_with_a_fresh_request_id_per_chunk(voice_stack):
    with StackFlowClient(voice_stack.port, timeout=120) as c:
        reply = setup(c, "llm", {"model": "qwen2.5-0.5B-p256-ax630c", **SETUP["llm"], "temperature": 0.0,
                                 "top_k": 1, "max_token_len": 24})
        assert reply["error"]["code"] == 0, reply
        assert reply["error"]["message"] == "model alias: qwen2.5-0.5B-p256-ax630c -> smollm2-135m-instruct"
        work_id = reply["work_id"]
        prompt = "What is the capital of France? Answer in one word."
        c.send({"request_id": "whole", "work_id": work_id, "action": "inference", "object": "llm.utf-8",
                "data": prompt})
        whole = "".join(m["data"]["delta"] for m in c.stream("whole", timeout=120))
        assert whole.strip()
        parts = [prompt[:10], prompt[10:25], prompt[25:]]
        ids = [fresh_id() for _ in parts]
        for index, (part, request_id) in enumerate(zip(parts, ids)):
            c.send({"request_id": request_id, "work_id": work_id, "action": "inference", "object": "llm.utf-8.stream",
                    "data": {"delta": part, "index": index, "finish": index == len(parts) - 1}})
        first = c.read(timeout=120)
        assert first["request_id"] == ids[-1] and first["error"]["code"] == 0, first
        chunks = [first] + ([] if first["data"]["finish"] else c.stream(ids[-1], timeout=120))
        assert [m["data"]["index"] for m in chunks] == list(range(len(chunks)))
        assert "".join(m["data"]["delta"] for m in chunks) == whole  # greedy: the same prompt, the same answer
        exit_task(c, work_id)


def test_tts_with_an_openai_voice_name_speaks_the_model_voice(voice_stack):
    """The plugin sends voice "alloy": the Piper voice speaks (not the espeak-ng fallback), and Whisper hears it."""
    sentence = "The quick brown fox jumps over the lazy dog."
    with StackFlowClient(voice_stack.port, timeout=120) as c:
        reply = setup(c, "melotts", {"model": "melotts-en-us", **SETUP["melotts"], "voice": "alloy"})
        assert reply["error"]["code"] == 0, reply
        message = reply["error"]["message"]
        assert "voice alloy" in message and "piper-en-us-joe-medium" in message, message
        tts = reply["work_id"]
        assert c.request({"request_id": "i", "work_id": tts, "action": "taskinfo"})["data"]["model"] == "melotts-en-us"
        c.send({"request_id": "say", "work_id": tts, "action": "inference", "object": "tts.utf-8", "data": sentence})
        spoken = base64.b64decode(c.read_for("say", timeout=120)["data"])
        pcm = np.frombuffer(spoken, "<i2")
        assert pcm.size > audio.RATE  # more than a second of speech
        exit_task(c, tts)
        asr = setup(c, "whisper", {"model": "whisper-tiny", **SETUP["whisper"], "language": "en"})["work_id"]
        heard = c.request({"request_id": "hear", "work_id": asr, "action": "inference", "object": "asr.pcm.base64",
                           "data": base64.b64encode(spoken).decode()}, timeout=120)
        assert heard["error"]["code"] == 0, heard
        errors = word_edit_distance(words(sentence), words(heard["data"]))
        assert errors <= 2, heard["data"]
        exit_task(c, asr)
        # A voice file that cannot be loaded is an error, never another voice.
        bad = setup(c, "tts", {"model": "piper-en-us-joe-medium", **SETUP["tts"], "voice": "/nonexistent/voice.onnx"})
        assert bad["error"]["code"] == -5 and "/nonexistent/voice.onnx" in bad["error"]["message"], bad


def test_every_stackflow_model_name_of_our_languages_resolves(voice_stack):
    with StackFlowClient(voice_stack.port, timeout=180) as c:
        for unit, names in STACKFLOW_NAMES.items():
            for name in names:
                reply = setup(c, unit, {"model": name, **SETUP[unit]}, request_id=name)
                assert reply["error"]["code"] == 0, (name, reply)
                assert reply["work_id"].startswith(unit + "."), reply
                exit_task(c, reply["work_id"])
        # Other languages: -5 naming what is installed, never a voice in the wrong language.
        for name in ("melotts-zh-cn", "melotts-ja-jp", "melotts_ja-jp-ax650", "melotts-es-es"):
            reply = setup(c, "melotts", {"model": name, **SETUP["melotts"]}, request_id=name)
            assert reply["error"]["code"] == -5, reply
            assert "is installed (installed: piper-en-us-joe-medium)" in reply["error"]["message"], reply
        for unit, name in (("tts", "single-speaker-fast"), ("asr", "sherpa-ncnn-streaming-zipformer-zh-14M-2023-02-23"),
                           ("kws", "sherpa-onnx-kws-zipformer-wenetspeech-3.3M-2024-01-01")):
            reply = setup(c, unit, {"model": name, **SETUP[unit]}, request_id=name)
            assert reply["error"]["code"] == -5 and "installed" in reply["error"]["message"], reply


def test_task_slots_are_visible_across_names_and_orphans_are_reclaimed(voice_stack):
    with StackFlowClient(voice_stack.port, timeout=120) as plugin:
        melotts = setup(plugin, "melotts", {"model": "melotts-en-us", **SETUP["melotts"]})["work_id"]
        for name in ("tts", "melotts"):
            listed = plugin.request({"request_id": "l", "work_id": name, "action": "taskinfo"})
            assert listed["data"] == [melotts], listed
        with StackFlowClient(voice_stack.port, timeout=120) as arduino:
            full = setup(arduino, "tts", {"model": "single_speaker_english_fast", **SETUP["tts"]})
            assert full["error"]["code"] == -21 and melotts in full["error"]["message"], full
            assert "owner connected" in full["error"]["message"]
    # The plugin left without exiting its task: nothing uses it, so a new setup takes its slot.
    with StackFlowClient(voice_stack.port, timeout=120) as arduino:
        deadline = time.monotonic() + 30
        while True:
            reply = setup(arduino, "tts", {"model": "single_speaker_english_fast", **SETUP["tts"]})
            if reply["error"]["code"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the disconnect reaches the unit shortly after the socket closes
        assert reply["error"]["code"] == 0, reply
        assert f"reclaimed {melotts}" in reply["error"]["message"], reply
        listed = arduino.request({"request_id": "l", "work_id": "melotts", "action": "taskinfo"})
        assert listed["data"] == [reply["work_id"]]
        exit_task(arduino, reply["work_id"])


def test_inference_to_the_audio_unit_is_no_unit_action(voice_stack):
    with StackFlowClient(voice_stack.port) as c:
        reply = c.request({"request_id": "a", "work_id": "audio", "action": "inference", "object": "audio.utf-8",
                           "data": "x"})
        assert reply["error"]["code"] == -18, reply


def test_reset_restarts_the_unit_processes_and_says_reset_over_on_the_uart(stack_factory, pty_pair):
    board, mcu = pty_pair
    stack = stack_factory(["skel", "vad"], {"uart.enabled": "true", "uart.device": str(board)})
    before = {unit: stack.pid_of(unit) for unit in ("skel", "vad", "sys", "bridge")}
    with serial.Serial(str(mcu), 115200, timeout=0.1) as port, StackFlowClient(stack.port) as c:
        work_id = c.request({"request_id": "s", "work_id": "skel", "action": "setup",
                             "data": {"model": "skel", "response_format": "skel.utf-8", "input": "skel.utf-8",
                                      "enoutput": True}})["work_id"]
        port.write(b'{"request_id":"sys_reset","work_id":"sys","action":"reset","object":"None","data":"None"}')
        started = time.monotonic()
        first, notice = BraceCounter(port).read(2, timeout=15)
        took = time.monotonic() - started
        assert first["error"]["message"] == "llm server restarting ..."
        assert notice["error"] == {"code": 0, "message": "reset over"} and notice["request_id"] == "0"
        assert took < 15, took  # the Arduino library's wait
        after = {unit: stack.pid_of(unit) for unit in ("skel", "vad", "sys", "bridge")}
        assert after["skel"] != before["skel"] and after["vad"] != before["vad"], (before, after)
        assert after["sys"] == before["sys"] and after["bridge"] == before["bridge"]
        # The TCP connection stayed open; the old task is gone and numbering restarts (spec §5.2).
        assert c.request({"request_id": "p", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
        assert c.request({"request_id": "t", "work_id": work_id, "action": "taskinfo"})["error"]["code"] == -6
        again = c.request({"request_id": "s2", "work_id": "skel", "action": "setup",
                           "data": {"model": "skel", "response_format": "skel.utf-8", "input": "skel.utf-8",
                                    "enoutput": True}})
        assert again["error"]["code"] == 0 and again["work_id"] == "skel.1000", again


class BraceCounter:
    """The Arduino library's reader: a frame ends where `{` and `}` counts balance, strings not considered."""

    def __init__(self, port: serial.Serial):
        self.port = port
        self.current = bytearray()
        self.depth = 0
        self.frames: list[dict] = []
        self.lost = 0

    def read(self, count: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count and time.monotonic() < deadline:
            for byte in self.port.read(self.port.in_waiting or 1):
                if self.depth == 0 and byte != ord("{"):
                    continue  # between frames (the newline)
                self.current.append(byte)
                self.depth += {ord("{"): 1, ord("}"): -1}.get(byte, 0)
                if self.depth == 0:
                    try:
                        frame = json.loads(self.current)
                    except ValueError:
                        frame = None
                    if isinstance(frame, dict) and "request_id" in frame and "data" in frame:
                        self.frames.append(frame)
                    else:
                        self.lost += 1  # cut in the wrong place: the library drops it
                    self.current.clear()
        out, self.frames = self.frames[:count], self.frames[count:]
        return out


@pytest.mark.parametrize("escape", [None, "false"])
def test_a_brace_counting_reader_loses_no_chunk_of_an_answer_full_of_braces(stack_factory, pty_pair, escape):
    """By default (escape_braces "uart") nothing is lost; with it off the same reader loses chunks."""
    board, mcu = pty_pair
    settings = {"uart.enabled": "true", "uart.device": str(board)}
    if escape is not None:
        settings["framing.escape_braces"] = escape
    stack_factory(["skel"], settings)
    answer = '{"a": {"b": [1, 2]}, "c": "}{"} ' * 8 + "}}} {{ }"
    with serial.Serial(str(mcu), 115200, timeout=0.1) as port:
        port.write(b'{"request_id":"s","work_id":"skel","action":"setup","object":"skel.setup","data":'
                   b'{"model":"skel","response_format":"skel.utf-8.stream","input":"skel.utf-8","enoutput":true,'
                   b'"mode":"echo"}}')
        reader = BraceCounter(port)
        (reply,) = reader.read(1)
        assert reply["error"]["code"] == 0, reply
        port.write(json.dumps({"request_id": "q", "work_id": reply["work_id"], "action": "inference",
                               "object": "skel.utf-8", "data": answer}).encode())
        chunks: list[dict] = []
        deadline = time.monotonic() + 30
        while not (chunks and chunks[-1]["data"]["finish"]) and time.monotonic() < deadline:
            chunks += reader.read(1, timeout=2)
        if escape == "false":
            assert reader.lost > 0  # what the Arduino library suffered before (spec §4.3)
            return
        assert reader.lost == 0
        assert chunks and chunks[-1]["data"]["finish"], chunks
        assert [m["data"]["index"] for m in chunks] == list(range(len(chunks)))  # none lost
        assert "".join(m["data"]["delta"] for m in chunks) == answer
        assert len(chunks) > 8
