"""llm decode and wake-word latency while the voice assistant idles, against llama.cpp under the same background.

    python tests/bench/bench_contention.py [--peer-python /tmp/peer-llama/bin/python] [--rounds 3]

Background, running through the whole benchmark: a `unitbus up` stack whose audio unit plays a looping
16 kHz WAV as its microphone (speech and pauses over room noise, holding no wake word), with a vad task
and a kws task ("HEY JARVIS") listening to sys.pcm, as the voice assistant does while it waits; the llm
unit is the fourth process. In each round, in turns:
- unitbus: a StackFlow TCP client streams a long greedy answer from the llm unit (end tokens banned, so
  it runs to --tokens); decode tok/s is (tokens - 1) over the time after the first delta;
- llama.cpp: llama-cpp-python on the same GGUF with the same threads, in a fresh process (bench_llm.py's
  peer side), greedy, --tokens tokens, while the same stack keeps listening.
Wake latency (as bench_wake_latency.py measures it): a second TCP client pushes "hey jarvis" clips with
the audio unit's `capture` action (pushed audio takes the loop's place) and times the end of the wake
word to the kws.bool it receives: once with the llm idle, once while the llm unit decodes answer after
answer. Only trials whose detection falls inside a decode are counted in the second row.

Prints a table; asserts nothing. Targets (issue 10): llm ratio >= 1.1x, wake delay <= 150 ms.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e" / "voice"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # the repo first: tests/units must not shadow the units package
from bench_llm import converted_gguf, cpu_facts, peer_arguments, run_child  # noqa: E402
from support import Stack, StackFlowClient  # noqa: E402
import voiceaudio  # noqa: E402

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a long story about a small robot who learns to paint the sea."}]
BACKGROUND = ["the kettle is on and the radio plays in the kitchen", "we should buy more bread tomorrow",
              "did you see the match last night", "the train was late again this morning"]
VOICES = [("en-us", 150), ("en-gb", 150), ("en-us", 120), ("en-gb-x-rp", 150)]


def background_wav(folder: Path) -> Path:
    """About 20 s of talk and pauses over noise: vad hears speech, kws hears no wake word."""
    parts: list = [0.5]
    for i, text in enumerate(BACKGROUND):
        voice, speed = VOICES[i % len(VOICES)]
        parts += [voiceaudio.speech(text, folder, voice, speed), 2.5]
    path = folder / "background.wav"
    path.write_bytes(voiceaudio.wav_bytes(voiceaudio.scene(parts, seed=99)[0]))
    return path


def wake_clips(folder: Path, trials: int) -> list[tuple[np.ndarray, float, float]]:
    """(pcm, start of the wake word s, end of it s) per trial, the lead-in varied against the 80 ms steps."""
    out = []
    for i in range(trials):
        voice, speed = VOICES[i % len(VOICES)]
        lead = 0.3 + 0.09 * i
        pcm, spans = voiceaudio.scene([lead, voiceaudio.speech("hey jarvis", folder, voice, speed), 1.5], seed=i)
        out.append((pcm, spans[0][0], spans[0][1]))
    return out


class Decoding:
    """Answers streamed back to back from the llm unit on its own TCP client, in a thread, until stopped;
    records each answer's decode span (first delta to finish) and rate."""

    def __init__(self, port: int, tokens: int, bias: dict[str, float], spin: bool):
        self.port, self.tokens, self.bias, self.spin = port, tokens, bias, spin
        self.spans: list[tuple[float, float]] = []
        self.rates: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decoding", daemon=True)

    def __enter__(self) -> "Decoding":
        self._thread.start()
        if not self._first.wait(120):
            raise TimeoutError("the llm unit sent no delta in 120 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(300)

    def _run(self) -> None:
        try:
            with StackFlowClient(self.port, timeout=300) as c:
                work_id = voiceaudio.setup(c, "llm", {"model": MODEL, "response_format": "llm.utf-8.stream", "enoutput": True,
                                                      "max_token_len": self.tokens, "spin": self.spin}, timeout=300)["work_id"]
                n = 0
                while True:
                    rate, span = stream_answer(c, work_id, f"d{n}", self.tokens, self.bias)
                    self.rates.append(rate)
                    self.spans.append(span)
                    self._first.set()
                    n += 1
                    if self._stop.is_set():
                        break
                c.request({"request_id": "x", "work_id": work_id, "action": "exit"})
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            self._first.set()

    def covers(self, start: float, end: float) -> bool:
        """Whether [start, end] lies inside one answer's decode."""
        return any(a <= start and end <= b for a, b in self.spans)


def stream_answer(c: StackFlowClient, work_id: str, request_id: str, tokens: int,
                  bias: dict[str, float]) -> tuple[float, tuple[float, float]]:
    """One streamed greedy answer: decode tok/s and its (first delta, finish) span in monotonic time."""
    c.send({"request_id": request_id, "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
            "data": {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "logit_bias": bias}})
    first = None
    while True:
        data = c.read_for(request_id)["data"]
        if first is None and data.get("delta"):
            first = time.monotonic()
        if data.get("finish"):
            break
    end = time.monotonic()
    done = data["usage"]["completion_tokens"]
    first = first if first is not None else end
    return (done - 1) / (end - first) if end > first else float("nan"), (first, end)


def wake_trials(c: StackFlowClient, clips: list[tuple[np.ndarray, float, float]]) -> tuple[list[tuple[float, float]], int, int]:
    """Per detected clip, (end of its wake word, arrival of its kws.bool) in monotonic time; how many clips
    went undetected; how many wakes came before a clip's wake word began (false ones, from the background)."""
    detected, missed, false = [], 0, 0
    for n, (pcm, start_s, end_s) in enumerate(clips):
        c.send({"request_id": f"c{n}", "work_id": "audio", "action": "capture", "object": "audio.pcm.base64",
                "data": voiceaudio.b64(pcm)})
        replied = None
        deadline = time.monotonic() + pcm.size / 16000 + 5
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = c.read(timeout=left)
            except TimeoutError:
                break
            if message["request_id"] == f"c{n}":
                replied = time.monotonic()
            elif message["object"] == "kws.bool" and replied is not None:
                now = time.monotonic()
                if now < replied + start_s:
                    false += 1
                    continue
                detected.append((replied + end_s, now))
                break
        else:
            missed += 1
        # The clip and the refractory period end, and a second wake of this clip is dropped.
        end = time.monotonic() + pcm.size / 16000 - end_s + 1.0
        while (left := end - time.monotonic()) > 0:
            try:
                c.read(timeout=left)
            except TimeoutError:
                break
    return detected, missed, false


def main() -> None:
    ap = peer_arguments(__doc__, "measured generations per peer process (median)")
    ap.add_argument("--rounds", type=int, default=3, help="turns of each side (best)")
    ap.add_argument("--trials", type=int, default=8, help="wake-word clips per condition")
    ap.add_argument("--kws-phases", type=int, choices=(1, 2, 4), help="the kws task's scoring grids (default: the unit's)")
    ap.add_argument("--no-spin", action="store_true", help="the llm unit's onnxruntime threads do not spin (setup spin:false)")
    ap.set_defaults(tokens=256)
    args = ap.parse_args()
    gguf = converted_gguf()
    from models.gguf_llama import default_out_dir

    stop_ids = json.loads((default_out_dir(Path(gguf)) / "config.json").read_text())["stop_ids"]
    bias = {str(i): -100.0 for i in stop_ids}  # -100: the most a StackFlow/OpenAI logit_bias takes
    folder = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    clips = wake_clips(folder, args.trials)
    settings = {"audio.capture": "wav", "audio.source_wav": str(background_wav(folder)), "audio.loop": "true",
                "audio.playback": "none"}
    stack = Stack(folder / "stack", ["audio", "vad", "kws", "llm"], settings,
                  env={"UNITBUS_THREADS": str(args.threads)}).start(180)
    ours: list[float] = []
    peer: list[float] = []
    try:
        with StackFlowClient(stack.port, timeout=120) as c:
            voiceaudio.setup(c, "vad", {"model": "silero-vad", "response_format": "vad.bool", "input": "sys.pcm",
                                        "enoutput": True}, "v")
            kws = {"model": "openwakeword", "response_format": "kws.bool", "input": "sys.pcm", "enoutput": True,
                   "kws": "HEY JARVIS", "refractory_ms": 1000}
            if args.kws_phases:
                kws["phases"] = args.kws_phases
            reply = voiceaudio.setup(c, "kws", kws, "k")
            assert reply["error"]["code"] == 0, reply
            idle = wake_trials(c, clips)
            with StackFlowClient(stack.port, timeout=300) as lc:
                llm = voiceaudio.setup(lc, "llm", {"model": MODEL, "response_format": "llm.utf-8.stream", "enoutput": True,
                                                   "max_token_len": args.tokens, "spin": not args.no_spin}, "l", 300)["work_id"]
                stream_answer(lc, llm, "warm", 8, bias)  # the model's first run is not measured
                for n in range(args.rounds):
                    ours.append(stream_answer(lc, llm, f"r{n}", args.tokens, bias)[0])
                    peer.append(run_child(args.peer_python, "peer", args, gguf)["decode_tps"])
                lc.request({"request_id": "x", "work_id": llm, "action": "exit"})
            with Decoding(stack.port, args.tokens, bias, not args.no_spin) as d:
                busy = wake_trials(c, clips)
            if d.error:
                raise d.error
            # Only detections inside an answer's decode count (the spans are known once the answers end).
            busy = ([t for t in busy[0] if d.covers(*t)], busy[1], busy[2])
            load = os.getloadavg()[0]
    finally:
        stack.stop(check=False)
    model, flags = cpu_facts()
    print(f"cpu: {model}, {os.cpu_count()} cores, avx2={'avx2' in flags}, avx512f={'avx512f' in flags}; "
          f"load average {load:.1f}")
    print(f"background: audio (looping WAV as the microphone), vad, kws listening; {args.threads} threads per side, "
          f"llm unit's threads {'sleeping' if args.no_spin else 'spinning'} between ops")
    print(f"\nllm decode under the background, {args.tokens} greedy tokens, best of {args.rounds}")
    print(f"{'side':<38}{'tok/s':>8}{'runs':>6}")
    print(f"{'unitbus llm unit over TCP':<38}{max(ours):>8.1f}{len(ours):>6}")
    print(f"{'llama-cpp-python, same GGUF':<38}{max(peer):>8.1f}{len(peer):>6}")
    print(f"ratio: {max(ours) / max(peer):.2f}x (target >= 1.1x)")
    print("\nwake word end -> kws.bool over TCP (ms)")
    print(f"{'llm':<10}{'n':>3}{'median':>9}{'mean':>9}{'max':>7}{'missed':>8}{'false':>7}")
    for name, (detected, missed, false) in (("idle", idle), ("decoding", busy)):
        ms = [(b - a) * 1000 for a, b in detected] or [float("nan")]
        print(f"{name:<10}{len(detected):>3}{statistics.median(ms):>9.0f}{statistics.mean(ms):>9.0f}{max(ms):>7.0f}"
              f"{missed:>8}{false:>7}")
    print("target: median <= 150 ms while the llm decodes")


if __name__ == "__main__":
    main()
