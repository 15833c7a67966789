"""Delay from the end of a spoken wake word to kws.bool, through the whole bus, against the engine alone.

bus:    a `unitbus up` stack (audio, kws) over TCP. Each trial pushes a clip ("hey jarvis" after a varied
        lead-in) with the audio unit's `capture` action, which plays it as the microphone in real time in
        10 ms frames: audio -> sys -> kws -> sys -> bridge -> TCP. The wake word ends `end_s` after the
        capture reply, so the delay is (kws.bool arrival) - (reply + end_s). The queue is empty before each
        push, so playback starts within one 10 ms period of the reply.
engine: the same pipeline without the bus, in this process: the audio unit's capture thread (same
        pacing, same 10 ms frames) hands frames through a queue to a thread running the same detector.
        Same clips, same waits, same reference (the push). What is left is the model (80 ms steps, the
        heads' reaction) and the CPU.

Both run in this one run on this machine; read the ratio. Prints a table; asserts nothing.

    python tests/bench/bench_wake_latency.py [--trials 12] [--phases 2]

--phases is the kws setup key (scoring grids staggered by 80/phases ms; the unit's default is 2), used by
both sides.
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e" / "voice"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))  # the repo first: tests/units must not shadow the units package
from support import Stack, StackFlowClient  # noqa: E402
import voiceaudio  # noqa: E402

VOICES = [("en-us", 150), ("en-gb", 150), ("en-us", 120), ("en-gb-x-rp", 150)]
FRAME = 160  # 10 ms


def clips(folder: Path, trials: int) -> list[tuple[np.ndarray, float]]:
    out = []
    for i in range(trials):
        voice, speed = VOICES[i % len(VOICES)]
        wake = voiceaudio.speech("hey jarvis", folder, voice, speed)
        lead = 0.3 + 0.09 * i  # varied phase against the 80 ms steps
        pcm, spans = voiceaudio.scene([lead, wake, 1.5], seed=i)
        out.append((pcm, spans[0][1]))
    return out


def engine_delays(trials: list[tuple[np.ndarray, float]], phases: int) -> list[float]:
    import queue
    import threading

    from units.audio.devices import Capture
    from units.kws.engine import load_kws

    params = json.loads((HERE.parent.parent / "models" / "mode_openwakeword.json").read_text())["mode_param"]
    detector = load_kws(params).detector(["HEY JARVIS"], refractory_ms=1000, phases=phases)
    frames: queue.Queue = queue.Queue()
    wakes: queue.Queue = queue.Queue()

    def listen() -> None:
        while (frame := frames.get()) is not None:
            if detector.feed(np.frombuffer(frame, dtype="<i2")):
                wakes.put(time.monotonic())

    listener = threading.Thread(target=listen)
    listener.start()
    capture = Capture("push", frames.put, 10)
    capture.start()
    delays = []
    try:
        time.sleep(1.0)  # as on the bus, the detector has heard silence before the first clip
        for pcm, end_s in trials:
            pushed = time.monotonic()
            capture.push(pcm)
            delays.append(wakes.get(timeout=20) - pushed - end_s)
            time.sleep(pcm.size / 16000 - end_s + 1.0)
            while not wakes.empty():
                wakes.get()
    finally:
        capture.stop()
        frames.put(None)
        listener.join()
    return delays


def bus_delays(trials: list[tuple[np.ndarray, float]], tmp: Path, phases: int) -> list[float]:
    stack = Stack(tmp, ["audio", "kws"], {"audio.capture": "push"}).start()
    delays = []
    try:
        with StackFlowClient(stack.port) as c:
            reply = c.request({"request_id": "s", "work_id": "kws", "action": "setup", "data": {
                "model": "openwakeword", "response_format": "kws.bool", "input": "sys.pcm", "enoutput": True,
                "kws": "HEY JARVIS", "refractory_ms": 1000, "phases": phases}}, timeout=60)
            assert reply["error"]["code"] == 0, reply
            for n, (pcm, end_s) in enumerate(trials):
                c.send({"request_id": f"c{n}", "work_id": "audio", "action": "capture", "object": "audio.pcm.base64",
                        "data": base64.b64encode(pcm.astype("<i2").tobytes()).decode()})
                replied = None
                while True:
                    message = c.read(timeout=20)
                    if message["request_id"] == f"c{n}":
                        replied = time.monotonic()
                    elif message["object"] == "kws.bool" and replied is not None:
                        delays.append(time.monotonic() - replied - end_s)
                        break
                # Let the clip and the refractory period end, and drop any second wake of this clip.
                end = time.monotonic() + pcm.size / 16000 - end_s + 1.0
                while (left := end - time.monotonic()) > 0:
                    try:
                        c.read(timeout=left)
                    except TimeoutError:
                        break
    finally:
        stack.stop(check=False)
    return delays


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{name:<8} {len(ms):>3} {statistics.median(ms):>9.0f} {statistics.mean(ms):>9.0f} "
            f"{min(ms):>7.0f} {max(ms):>7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--phases", type=int, default=2, choices=(1, 2, 4))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trials = clips(folder, args.trials)
        engine = engine_delays(trials, args.phases)
        bus = bus_delays(trials, folder / "stack", args.phases)
    print(f"delay from the end of the wake word to the detection (ms), {args.phases} scoring grid(s)")
    print(f"{'path':<8} {'n':>3} {'median':>9} {'mean':>9} {'min':>7} {'max':>7}")
    print(row("engine", engine))
    print(row("bus", bus))
    print(f"ratio bus/engine (median): {statistics.median(bus) / statistics.median(engine):.2f}; "
          f"bus overhead (median): {(statistics.median(bus) - statistics.median(engine)) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
