"""OpenAI audio routes on the asr (whisper) and tts units of a real stack (http-apis.md §2.8)."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import time
import wave

import httpx
import openai
import pytest

from support import Stack, StackFlowClient, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio")
    subprocess.run(["espeak-ng", "-w", str(tmp / "raw.wav"), "Hello world, this is a test."], check=True)
    subprocess.run(["sox", str(tmp / "raw.wav"), "-r", "16000", "-c", "1", "-b", "16", str(tmp / "hello.wav")],
                   check=True)
    port = free_port()
    stack = Stack(tmp, ["asr", "tts"], {"up.http": "true", "http.openai.port": str(port),
                                        "http.ollama.enabled": "false", "http.ai00.enabled": "false",
                                        "http.cortex.enabled": "false"}).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(base + "/livez")
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, stack.log()[-3000:]
            time.sleep(0.2)
    yield base, tmp, stack
    stack.stop()


def test_transcription_with_the_openai_client(audio):
    base, tmp, _ = audio
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    with open(tmp / "hello.wav", "rb") as fh:
        result = client.audio.transcriptions.create(model="whisper-1", file=fh)
    assert "hello world" in result.text.lower()
    # The espeak original (22050 Hz) is converted by the unit; response_format=text is a plain body.
    r = httpx.post(base + "/v1/audio/transcriptions", timeout=300, data={"response_format": "text"},
                   files={"file": ("raw.wav", (tmp / "raw.wav").read_bytes(), "audio/wav")})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain") and "test" in r.text.lower()
    r = httpx.post(base + "/v1/audio/transcriptions", data={"response_format": "srt"},
                   files={"file": ("a.wav", (tmp / "hello.wav").read_bytes(), "audio/wav")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = httpx.post(base + "/v1/audio/transcriptions", files={"file": ("a.mp3", b"ID3\x03junk", "audio/mpeg")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def tts_tasks(stack: Stack) -> list[str]:
    with StackFlowClient(stack.port) as client:
        reply = client.request({"request_id": "ls", "work_id": "sys", "action": "lstask"})
    return sorted(t["work_id"] for t in reply["data"] if t["work_id"].split(".")[0] in ("tts", "melotts"))


def test_speech_round_trip(audio):
    base, _, stack = audio
    r = httpx.post(base + "/v1/audio/speech", timeout=300,
                   json={"model": "tts-1", "input": "Good morning, my friend.", "voice": "alloy"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(r.content)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        seconds = wav.getnframes() / 16000
    assert 0.7 < seconds < 5
    heard = httpx.post(base + "/v1/audio/transcriptions", timeout=300,
                       files={"file": ("speech.wav", r.content, "audio/wav")}).json()["text"].lower()
    assert "morning" in heard and "friend" in heard
    pcm = httpx.post(base + "/v1/audio/speech", timeout=300,
                     json={"model": "tts-1", "input": "Good morning, my friend.", "response_format": "pcm",
                           "speed": 2.0})
    assert pcm.status_code == 200 and len(pcm.content) % 2 == 0
    assert len(pcm.content) / 2 / 16000 < seconds * 0.8  # twice the speaking rate is clearly shorter
    # The speed travels with each request (tts.speech): the same task spoke both, nothing was reloaded.
    tasks = tts_tasks(stack)
    assert len(tasks) == 1
    slow = httpx.post(base + "/v1/audio/speech", timeout=300, json={"model": "tts-1", "input": "Hi.", "speed": 0.5})
    assert slow.status_code == 200 and tts_tasks(stack) == tasks
    for body, param in (({"input": "x", "response_format": "mp3"}, "response_format"), ({"input": "x" * 5000}, "input"),
                        ({"input": "x", "speed": 9}, "speed")):
        bad = httpx.post(base + "/v1/audio/speech", json={"model": "tts-1", **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param


def test_speech_is_cancelled_when_the_client_leaves(audio):
    base, _, stack = audio
    port = int(base.rsplit(":", 1)[1])
    warm = httpx.post(base + "/v1/audio/speech", timeout=300, json={"model": "tts-1", "input": "Warm up."})
    assert warm.status_code == 200  # the voice is loaded: the request below reaches the unit at once
    body = json.dumps({"model": "tts-1", "input": "This is a long sentence to read aloud. " * 90}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(1.5)  # the synthesis has started; then the client goes away without reading
    deadline = time.monotonic() + 60
    while "client gone, cancelling" not in stack.log():
        assert time.monotonic() < deadline, stack.log()[-3000:]
        time.sleep(0.2)
    r = httpx.post(base + "/v1/audio/speech", timeout=300, json={"model": "tts-1", "input": "Still here."})
    assert r.status_code == 200
