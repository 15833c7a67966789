"""ASR latency per short utterance: unitbus (Whisper tiny.en on onnxruntime) against faster-whisper int8 on
the same CTranslate2 weights, measured in the same run, rounds interleaved so machine noise hits both.

    python tests/bench/bench_asr.py [--peer-python /tmp/peer-asr/bin/python] [--rounds 3]

faster-whisper runs in its own venv (never a unitbus dependency) as a subprocess that times each
utterance inside the process, as we do here; it gets 2 threads, as our encoder does (our decoder takes
1). Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
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

PEER_SCRIPT = r"""
import json, sys, time, wave
import numpy as np
from faster_whisper import WhisperModel
model_dir, files = sys.argv[1], sys.argv[2:]
model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=2, num_workers=1)
audio = []
for f in files:
    with wave.open(f) as w:
        audio.append(np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0)
def run(pcm, beam):
    segments, _ = model.transcribe(pcm, beam_size=beam, language="en", without_timestamps=True,
                                   vad_filter=False, condition_on_previous_text=False)
    return "".join(s.text for s in segments).strip()
run(audio[0], 1)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    beam = int(line)
    out = []
    for pcm in audio:
        t = time.perf_counter()
        text = run(pcm, beam)
        out.append({"seconds": time.perf_counter() - t, "text": text})
    print(json.dumps(out), flush=True)
"""


def load_speech_helper():
    path = ROOT / "tests" / "units" / "asr" / "asr_speech.py"
    spec = importlib.util.spec_from_file_location("asr_speech", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"mean": statistics.fmean(times), "median": statistics.median(times),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default="/tmp/peer-asr/bin/python")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from models.whisper_ct2 import source_dir
    from units.asr.engine import load_asr

    speech = load_speech_helper()
    manifest = json.loads((ROOT / "models" / "mode_whisper-tiny.en.json").read_text())
    model_dir = source_dir(manifest["mode_param"])
    work = Path(tempfile.mkdtemp(prefix="bench_asr_"))
    items = speech.build_set(work)
    refs = [ref for ref, _ in items]
    pcms = [speech.read_wav(path) for _, path in items]
    durations = [len(p) / 16000 for p in pcms]

    engines = {"unitbus": load_asr(manifest["mode_param"]),
               "unitbus 30 s window": load_asr({**manifest["mode_param"], "window_pad_s": 0})}
    for engine in engines.values():
        engine.transcribe(pcms[0])
    peer = subprocess.Popen([args.peer_python, "-c", PEER_SCRIPT, str(model_dir), *[str(p) for _, p in items]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(peer.stdout.readline())["ready"]

    times: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            texts[name] = []
            for pcm in pcms:
                t = time.perf_counter()
                texts[name].append(engine.transcribe(pcm))
                times.setdefault(name, []).append(time.perf_counter() - t)
        for beam in (1, 5):
            name = f"faster-whisper beam {beam}"
            peer.stdin.write(f"{beam}\n")
            peer.stdin.flush()
            results = json.loads(peer.stdout.readline())
            times.setdefault(name, []).extend(r["seconds"] for r in results)
            texts[name] = [r["text"] for r in results]
    peer.stdin.close()
    peer.wait(timeout=60)

    base = summary(times["faster-whisper beam 1"])
    print(f"\n{len(pcms)} utterances ({min(durations):.1f}-{max(durations):.1f} s of espeak-ng speech, 3 voices), "
          f"{args.rounds} rounds, latency per utterance in seconds\n"
          f"(unitbus: encoder 2 threads, decoder 1; faster-whisper: int8, cpu_threads=2; both on the same weights)")
    header = f"{'engine':<24}{'mean':>8}{'median':>8}{'p90':>8}{'WER':>7}{'mean vs fw greedy':>19}{'vs fw beam 5':>14}"
    print(header)
    print("-" * len(header))
    beam5 = summary(times["faster-whisper beam 5"])
    for name in ["unitbus", "unitbus 30 s window", "faster-whisper beam 1", "faster-whisper beam 5"]:
        s = summary(times[name])
        score = speech.wer(list(zip(refs, texts[name])))
        print(f"{name:<24}{s['mean']:>8.3f}{s['median']:>8.3f}{s['p90']:>8.3f}{score:>7.3f}"
              f"{s['mean'] / base['mean']:>18.2f}x{s['mean'] / beam5['mean']:>13.2f}x")
    print("\ntranscripts (reference | unitbus | faster-whisper greedy) where they differ:")
    for ref, ours, theirs in zip(refs, texts["unitbus"], texts["faster-whisper beam 1"]):
        if speech.normalize(ours) != speech.normalize(theirs) or speech.normalize(ours) != speech.normalize(ref):
            print(f"  {ref} | {ours} | {theirs}")


if __name__ == "__main__":
    main()
