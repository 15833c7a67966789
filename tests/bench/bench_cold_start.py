"""Cold start: `unitbus up` with cached models to the first streamed llm token over TCP, and to the first
spoken answer of the voice chain.

llm:   start `unitbus up` (sys, bridge, llm), and as soon as the bridge's port accepts, set up the llm
       and send one question; the clock runs from the process start to the first streamed delta.
voice: start the voice stack (audio, kws, asr, llm, tts), set the README's chain up, push "hey jarvis,
       what is the capital of france" through the audio unit; the clock runs from the process start to
       the first tts audio, minus the length of the pushed speech up to the question's end (which plays
       in real time whatever the stack does). Twice: the README's four setups one after the other (each
       names the work_ids before it), and the four sent at once, each unit loading its model while the
       others load theirs, then linked (`link`, milliseconds each).
The peer is the llm engine alone in a fresh Python process (import, load, first token): what a start
costs without the bus. Each is run --rounds times; medians printed, nothing asserted. Models must be
converted already (run the tests or `unitbus models convert` once).

    python tests/bench/bench_cold_start.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e" / "voice"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))  # the repo first: tests/units must not shadow the units package
from support import Stack, StackFlowClient  # noqa: E402
import voiceaudio  # noqa: E402

LLM = {"model": "smollm2-135m-instruct", "response_format": "llm.utf-8.stream", "input": "llm.utf-8",
       "enoutput": True, "max_token_len": 16, "prompt": "You are a helpful assistant."}
ENGINE_ALONE = r"""
import sys, time, json
t0 = float(sys.argv[1])
from units.llm.engine import load_llm
engine = load_llm({"model_dir": sys.argv[2]})
ids = engine.tokenizer.encode("<|im_start|>user\nWhat is a bus?<|im_end|>\n<|im_start|>assistant\n")
for _ in engine.generate(ids, max_new_tokens=1):
    break
print(json.dumps(time.time() - t0))
"""


def wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise TimeoutError(f"port {port} never opened")


def llm_round(tmp: Path) -> float:
    t0 = time.monotonic()
    stack = Stack(tmp, ["llm"], {})
    stack.start(60)  # returns at "unitbus up:", when sys, bridge and units are started
    try:
        wait_port(stack.port, t0 + 60)
        with StackFlowClient(stack.port, timeout=60) as c:
            work_id = voiceaudio.setup(c, "llm", LLM)["work_id"]
            c.send({"request_id": "q", "work_id": work_id, "action": "inference", "object": "llm.utf-8",
                    "data": "What is a bus?"})
            c.read_for("q", timeout=60)
            return time.monotonic() - t0
    finally:
        stack.stop(check=False)


KWS = {"model": "openwakeword", "response_format": "kws.bool", "input": "sys.pcm", "enoutput": True, "kws": "HEY JARVIS"}
ASR = {"model": "whisper-tiny.en", "response_format": "asr.utf-8.stream", "input": "sys.pcm", "enoutput": True}
TTS = {"model": "melotts-en-us", "response_format": "sys.pcm", "input": "tts.utf-8", "enoutput": True}


def chain_in_sequence(c: StackFlowClient) -> str:
    """The README's chain: each setup names the work_ids of the ones before it. Returns tts's work_id."""
    kws = voiceaudio.setup(c, "kws", KWS, "1")["work_id"]
    asr = voiceaudio.setup(c, "asr", {**ASR, "input": ["sys.pcm", kws]}, "2")["work_id"]
    llm = voiceaudio.setup(c, "llm", {**LLM, "input": ["llm.utf-8", asr, kws]}, "3")["work_id"]
    return voiceaudio.setup(c, "melotts", {**TTS, "input": ["tts.utf-8", llm, kws]}, "4")["work_id"]


def chain_at_once(c: StackFlowClient) -> str:
    """The same chain: the four setups sent together (the units load in parallel), then the links."""
    setups = {"1": ("kws", KWS), "2": ("asr", ASR), "3": ("llm", LLM), "4": ("melotts", TTS)}
    for request_id, (unit, data) in setups.items():
        c.send({"request_id": request_id, "work_id": unit, "action": "setup", "object": f"{unit}.setup", "data": data})
    kws, asr, llm, tts = (c.read_for(request_id, 120)["work_id"] for request_id in setups)
    for n, (task, upstream) in enumerate([(asr, kws), (llm, asr), (llm, kws), (tts, llm), (tts, kws)]):
        reply = voiceaudio.action(c, task, "link", f"link{n}", data=upstream)
        assert reply["error"]["code"] == 0, reply
    return tts


def voice_round(tmp: Path, clip, speech_s: float, chain) -> tuple[float, float]:
    t0 = time.monotonic()
    stack = Stack(tmp, ["audio", "kws", "asr", "llm", "tts"], {"audio.capture": "push", "audio.playback": "none"})
    stack.start(60)
    try:
        with StackFlowClient(stack.port, timeout=120) as c:
            tts = chain(c)
            pushed = time.monotonic()
            voiceaudio.capture(c, clip)
            voiceaudio.outputs_until(c, lambda got: any(m["work_id"] == tts for m in got), 120)
            return time.monotonic() - t0 - speech_s, pushed - t0
    finally:
        stack.stop(check=False)


def engine_round() -> float:
    from core.paths import cache_dir

    out = subprocess.run([sys.executable, "-c", ENGINE_ALONE, repr(time.time()), str(cache_dir() / "SmolLM2-135M-Instruct.Q4_1")],
                         capture_output=True, text=True, cwd=HERE.parent.parent, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    wake = voiceaudio.speech("hey jarvis", tmp)
    question = voiceaudio.speech("what is the capital of france", tmp)
    clip, spans = voiceaudio.scene([0.5, wake, 1.0, question, 0.5])
    speech_s = spans[-1][1]  # the question ends here: nothing can answer before
    llm, alone = [], []
    voice: dict[str, list[tuple[float, float]]] = {"in sequence": [], "at once": []}
    for r in range(args.rounds):
        alone.append(engine_round())
        llm.append(llm_round(tmp / f"llm{r}"))
        voice["in sequence"].append(voice_round(tmp / f"voice{r}", clip, speech_s, chain_in_sequence))
        voice["at once"].append(voice_round(tmp / f"voice-at-once{r}", clip, speech_s, chain_at_once))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"cpu: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; medians of {args.rounds}")
    med = statistics.median
    print(f"unitbus up -> first llm token over TCP      {med(llm):6.2f} s   (llm engine alone in a new process: "
          f"{med(alone):.2f} s, {med(llm) / med(alone):.2f}x)   target <= 3 s")
    for how, rounds in voice.items():
        print(f"unitbus up -> first spoken answer (voice)   {med(t for t, _ in rounds):6.2f} s   (setups {how}: "
              f"{med(s for _, s in rounds):.2f} s from the start)   target <= 5 s")


if __name__ == "__main__":
    main()
