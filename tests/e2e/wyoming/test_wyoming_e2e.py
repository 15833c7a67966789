"""The Wyoming server against the real units, through the `wyoming` package's own client."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk
from wyoming.handle import Handled, HandledChunk
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice
from wyoming.wake import Detect, Detection

from wyclient import RATE, read_until, send_audio, start_wyoming
from core.audio import resample

LIGHTS = {"turn", "on", "the", "kitchen", "lights"}


def words(text: str) -> set[str]:
    return {w.strip(".,!?").lower() for w in text.split()}


async def transcribe(ws, pcm: bytes, **audio) -> list:
    async with ws.client() as client:
        await client.write_event(Transcribe(language="en").event())
        await send_audio(client, pcm, **audio)
        events = await read_until(client, "transcript-stop")
    return events


async def describe(ws) -> Info:
    async with ws.client() as client:
        await client.write_event(Describe().event())
        events = await read_until(client, "info", timeout=10)
        return Info.from_event(events[-1])


def test_describe_lists_every_service(wyoming_stack):
    info = asyncio.run(describe(wyoming_stack))
    asr, tts, wake, handle = info.asr[0], info.tts[0], info.wake[0], info.handle[0]
    assert asr.supports_transcript_streaming and [m.name for m in asr.models] == ["whisper-tiny.en"]
    assert asr.models[0].languages == ["en"] and asr.models[0].attribution.name == "openai"
    assert tts.supports_synthesize_streaming and tts.voices[0].name == "piper-en-us-joe-medium"
    assert tts.voices[0].languages == ["en_US"]
    names = {m.name: m for m in wake.models}
    assert {"hey_jarvis", "alexa", "hey_mycroft", "hey_rhasspy"} <= set(names)
    assert names["hey_jarvis"].phrase == "hey jarvis" and names["hey_jarvis"].version == "0.1"
    assert "CC BY-NC-SA 4.0" in names["hey_jarvis"].description
    assert names["hey_jarvis"].attribution.url == "https://github.com/dscripka/openWakeWord"
    assert handle.supports_handled_streaming and handle.models[0].name == "smollm2-135m-instruct"
    assert all(p.version for p in (asr, tts, wake, handle)) and all(m.version for m in asr.models + handle.models)


def test_transcribe_streams_and_answers(wyoming_stack, speech):
    events = asyncio.run(transcribe(wyoming_stack, speech["lights"].tobytes()))
    types = [e.type for e in events]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"], types
    chunks = [e.data["text"] for e in events if e.type == "transcript-chunk"]
    text = Transcript.from_event(events[-2]).text
    assert " ".join(chunks) == text
    assert len(LIGHTS & words(text)) >= 4, text


def test_transcribe_converts_any_format(wyoming_stack, speech):
    # 44.1 kHz, stereo, 32-bit: converted to the unit's 16 kHz mono 16-bit on the way in.
    mono = resample(speech["lights"].astype(np.float32) / 32768.0, RATE, 44100)
    stereo = np.repeat((np.clip(mono, -1, 1) * (2**31 - 1)).astype("<i4")[:, None], 2, axis=1)
    events = asyncio.run(transcribe(wyoming_stack, stereo.tobytes(), rate=44100, width=4, channels=2))
    text = Transcript.from_event(events[-2]).text
    assert len(LIGHTS & words(text)) >= 4, text


async def detect(ws, pcm: bytes, names=None, realtime: float = 0.0) -> list:
    async with ws.client() as client:
        await client.write_event(Detect(names=names).event())
        sender = asyncio.create_task(send_audio(client, pcm, realtime=realtime))
        events = await read_until(client, "not-detected", "detection")
        await sender
        if events[-1].type == "detection":
            await asyncio.sleep(0.5)  # audio-stop after a detection: nothing more to say
        return events


def test_detect_wake_word_in_a_live_stream(wyoming_stack, speech):
    pcm = np.concatenate([speech["silence"], speech["wake"], speech["silence"]])
    events = asyncio.run(detect(wyoming_stack, pcm.tobytes(), ["hey_jarvis", "alexa"], realtime=4.0))
    detection = Detection.from_event(events[-1])
    assert detection.name == "hey_jarvis"
    # The wake word ends about 2.5 + 1.0 s in (silence, then "hey jarvis" and its trailing second).
    assert 2000 <= detection.timestamp <= 4500, detection.timestamp


def test_detect_only_the_words_asked_for(wyoming_stack, speech):
    events = asyncio.run(detect(wyoming_stack, speech["wake"].tobytes(), ["alexa"]))
    assert [e.type for e in events] == ["not-detected"]
    events = asyncio.run(detect(wyoming_stack, speech["silence"].tobytes()))
    assert [e.type for e in events] == ["not-detected"]


def test_unknown_wake_word_is_an_error_naming_the_choices(wyoming_stack):
    async def run():
        async with wyoming_stack.client() as client:
            await client.write_event(Detect(names=["okay_nabu"]).event())
            return await read_until(client, "error", timeout=10)

    error = asyncio.run(run())[-1]
    assert error.type == "error" and "okay_nabu" in error.data["text"] and "hey_jarvis" in error.data["text"]


def pcm_of(events) -> bytes:
    return b"".join(AudioChunk.from_event(e).audio for e in events if e.type == "audio-chunk")


def test_synthesize_speaks_what_asr_understands(wyoming_stack):
    async def run():
        async with wyoming_stack.client() as client:
            await client.write_event(Synthesize(text="Turn on the kitchen lights.",
                                                voice=SynthesizeVoice(name="piper-en-us-joe-medium")).event())
            return await read_until(client, "audio-stop")

    events = asyncio.run(run())
    assert events[0].type == "audio-start" and events[0].data["rate"] == RATE
    pcm = pcm_of(events)
    assert len(pcm) > RATE  # over half a second of speech
    text = Transcript.from_event(asyncio.run(transcribe(wyoming_stack, pcm))[-2]).text
    assert len(LIGHTS & words(text)) >= 4, text


def test_streamed_synthesize_speaks_before_the_text_is_complete(wyoming_stack):
    async def run():
        async with wyoming_stack.client() as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text="The first sentence is here. The sec").event())
            first = await read_until(client, "audio-chunk")  # before the rest of the text is sent
            for part in ("ond sentence ", "follows it."):
                await client.write_event(SynthesizeChunk(text=part).event())
            await client.write_event(Synthesize(text="The first sentence is here. The second sentence follows it.")
                                     .event())  # the compatibility copy: must not be spoken again
            await client.write_event(SynthesizeStop().event())
            rest = await read_until(client, "synthesize-stopped")
            return first, rest

    first, rest = asyncio.run(run())
    assert [e.type for e in first] == ["audio-start", "audio-chunk"]
    events = first + rest
    assert [e.type for e in events].count("audio-start") == 2 == [e.type for e in events].count("audio-stop")
    assert events[-1].type == "synthesize-stopped"
    seconds = len(pcm_of(events)) / 2 / RATE
    assert 2.0 < seconds < 8.0, seconds  # two sentences, spoken once


def test_handle_streams_the_llm_answer(wyoming_stack):
    async def run():
        async with wyoming_stack.client() as client:
            await client.write_event(Transcript(text="What is the capital of France?").event())
            return await read_until(client, "handled-stop", timeout=180)

    events = asyncio.run(run())
    types = [e.type for e in events]
    assert types[0] == "handled-start" and types[-2:] == ["handled", "handled-stop"], types
    chunks = [HandledChunk.from_event(e).text for e in events if e.type == "handled-chunk"]
    answer = Handled.from_event(events[-2]).text
    assert chunks and answer == "".join(chunks).strip() and answer


def test_two_clients_at_once(wyoming_stack, speech):
    async def run():
        async def speak():
            async with wyoming_stack.client() as client:
                await client.write_event(Synthesize(text="Hello from the second client.").event())
                return await read_until(client, "audio-stop")

        return await asyncio.gather(transcribe(wyoming_stack, speech["lights"].tobytes(), realtime=5.0), speak(),
                                    transcribe(wyoming_stack, speech["lights"].tobytes()))

    heard, spoken, heard_too = asyncio.run(run())
    for events in (heard, heard_too):
        assert len(LIGHTS & words(Transcript.from_event(events[-2]).text)) >= 4
    assert spoken[-1].type == "audio-stop" and len(pcm_of(spoken)) > RATE


def test_malformed_events_get_errors_and_the_connection_goes_on(wyoming_stack):
    async def run():
        reader, writer = await asyncio.open_connection("127.0.0.1", wyoming_stack.port)
        answers = []

        async def read_one():
            header = json.loads(await asyncio.wait_for(reader.readline(), 30))
            data = header.get("data") or {}
            if header.get("data_length"):
                data.update(json.loads(await reader.readexactly(header["data_length"])))
            if header.get("payload_length"):
                await reader.readexactly(header["payload_length"])
            return header["type"], data

        for line in (b"this is not json\n", b'["a list"]\n', b'{"type": "synthesize"}\n',
                     b'{"type": "audio-chunk", "data": {"rate": 0, "width": 2, "channels": 1}}\n',
                     b'{"type": "synthesize-chunk", "data": {"text": "x"}}\n'):
            writer.write(line)
            answers.append(await read_one())
        writer.write(b'{"type": "describe"}\n{"type": "ping", "data": {"text": "still there?"}}\n')
        answers += [await read_one(), await read_one()]
        # A length that cannot be skipped ends this connection only, after saying why.
        writer.write(b'{"type": "audio-chunk", "payload_length": -5}\n')
        answers.append(await read_one())
        closed = await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        return answers, closed

    answers, closed = asyncio.run(run())
    assert [t for t, _ in answers] == ["error"] * 5 + ["info", "pong", "error"]
    texts = [d.get("text", "") for _, d in answers]
    assert "not JSON" in texts[0] and "missing text" in texts[2] and "rate" in texts[3]
    assert "synthesize-start" in texts[4] and texts[6] == "still there?" and "payload_length" in texts[7] and closed
    info = asyncio.run(describe(wyoming_stack))  # the server is still there for everyone else
    assert info.asr


def test_describe_answers_while_loading_and_with_sys_or_a_unit_stopped(tmp_path, speech):
    """describe is built from the manifests the server holds: it is answered while models load and while
    a unit, or sys itself, is stopped and answers nothing (read_until fails after 10 s otherwise)."""
    ws = start_wyoming(tmp_path, ["asr", "llm", "kws"])  # no tts unit
    try:
        async def run():
            async with ws.client() as loader, ws.client() as asker:
                await asker.write_event(Transcript(text="Say hello.").event())  # loads the llm
                await loader.write_event(Transcribe().event())  # loads whisper
                await send_audio(loader, speech["lights"].tobytes())
                described = [await describe(ws) for _ in range(3)]
                for name in ("kws", "sys"):
                    pid = ws.stack.pid_of(name)
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        described.append(await describe(ws))
                    finally:
                        os.kill(pid, signal.SIGCONT)
                heard = await read_until(loader, "transcript-stop")
                answered = await read_until(asker, "handled-stop", timeout=180)
            async with ws.client() as client:
                await client.write_event(Synthesize(text="Nobody speaks.").event())
                error = (await read_until(client, "error", timeout=60))[-1]
            return described, heard, answered, error

        described, heard, answered, error = asyncio.run(run())
        assert len(described) == 5 and all(info.tts and info.wake for info in described)  # listed, running or not
        assert heard[-1].type == "transcript-stop" and answered[-1].type == "handled-stop"
        assert error.type == "error" and "tts unit is not running" in error.data["text"], error.data
    finally:
        ws.stack.stop()


def test_zeroconf_advertises_when_bound_off_loopback(tmp_path):
    from zeroconf.asyncio import AsyncZeroconf

    name = f"unitbus-test-{os.getpid()}"
    ws = start_wyoming(tmp_path, ["kws"], {"wyoming.bind": "0.0.0.0", "wyoming.zeroconf_name": name})
    try:
        async def look():
            browser = AsyncZeroconf()
            try:
                return await browser.async_get_service_info("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.",
                                                            timeout=5000)
            finally:
                await browser.async_close()

        found = asyncio.run(look())
        assert found is not None and found.port == ws.port
        assert asyncio.run(describe(ws)).wake  # and it serves on that port
    finally:
        ws.stack.stop()
