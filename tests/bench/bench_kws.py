"""kws benchmark: unitbus's openWakeWord engine against the openwakeword 0.5.1 library, same run, same files.

Measures the compute cost per second of audio (fed in equal chunks to both) and the delay from the end of
the wake phrase to the detection, on espeak-ng speech placed in low noise. unitbus runs twice: with one
scoring grid (the library's own 80 ms steps, whose peak scores are compared with the library's) and with
the kws unit's default of two grids staggered by 40 ms. The library runs in a subprocess
from a throwaway venv that has it (default /tmp/peer-oww, override with PEER_OWW_PYTHON):

    python -m venv /tmp/peer-oww
    /tmp/peer-oww/bin/pip install onnxruntime numpy tqdm scipy scikit-learn
    /tmp/peer-oww/bin/pip install --no-deps openwakeword==0.5.1
    python tests/bench/bench_kws.py

Timings are the best of several repeats (shared machines are noisy); nothing here asserts a time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "units" / "kws"))

import wakeaudio  # noqa: E402
from core.paths import resolve_pkg_url  # noqa: E402
from units.kws.engine import SAMPLE_RATE, STEP_SAMPLES, display_name, load_kws  # noqa: E402

PEER_PYTHON = os.environ.get("PEER_OWW_PYTHON", "/tmp/peer-oww/bin/python")
HEADS = ["hey_jarvis_v0.1", "hey_rhasspy_v0.1", "alexa_v0.1"]
CHUNKS = [1280, 16000]  # the library's native 80 ms step, and 1 s blocks
REPEATS = 3
LEAD_STEPS = 30
THRESHOLD = 0.5

PEER_SCRIPT = r"""
import json, sys, time
import numpy as np
from openwakeword.model import Model

cfg = json.loads(sys.argv[1])
model = Model(wakeword_models=cfg["heads"], inference_framework="onnx",
              melspec_model_path=cfg["mel"], embedding_model_path=cfg["emb"])
names = list(model.models)
data = np.load(cfg["audio"])
stream, bounds = data["stream"], data["bounds"]

costs = {}
for chunk in cfg["chunks"]:
    best = None
    for _ in range(cfg["repeats"]):
        model.reset()
        t0 = time.perf_counter()
        for i in range(0, len(stream), chunk):
            model.predict(stream[i:i + chunk])
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    costs[chunk] = best

# Detection time per scene: the end of the first 80 ms step whose score reaches the threshold.
scenes = []
# A fresh Model per scene: Model.reset() clears only the score history, not the audio features.
for start, end in bounds:
    model = Model(wakeword_models=cfg["heads"], inference_framework="onnx",
                  melspec_model_path=cfg["mel"], embedding_model_path=cfg["emb"])
    first, peaks, lead_alarms = {}, dict.fromkeys(names, 0.0), 0
    clip = stream[start:end]
    for k, i in enumerate(range(0, len(clip) - len(clip) % 1280, 1280)):
        scores = model.predict(clip[i:i + 1280])
        for name in names:
            s = float(scores[name])
            if k < cfg["lead_steps"]:
                lead_alarms += s >= cfg["threshold"]
                continue
            peaks[name] = max(peaks[name], s)
            if s >= cfg["threshold"] and name not in first:
                first[name] = (k + 1 - cfg["lead_steps"]) * 1280
    scenes.append({"first": first, "peaks": peaks, "lead_alarms": lead_alarms})
print(json.dumps({"costs": costs, "scenes": scenes}))
"""


def ours(stream: np.ndarray, bounds: list[tuple[int, int]], phases: int) -> dict:
    model = load_kws({"keyword_models": [f"pkg://openwakeword/resources/models/{h}.onnx" for h in HEADS]})
    words = [display_name(h) for h in HEADS]
    costs = {}
    for chunk in CHUNKS:
        best = None
        for _ in range(REPEATS):
            det = model.detector(words, threshold=THRESHOLD, phases=phases)
            t0 = time.perf_counter()
            for i in range(0, len(stream), chunk):
                det.feed(stream[i:i + chunk])
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        costs[chunk] = best
    scenes = []
    for start, end in bounds:
        det = model.detector(words, threshold=THRESHOLD, refractory_ms=0, phases=phases)
        lead = LEAD_STEPS * STEP_SAMPLES
        lead_alarms = len(det.feed(stream[start:start + lead]))
        det.max_scores = dict.fromkeys(det.max_scores, 0.0)  # peaks of the scene proper
        first: dict[str, int] = {}
        for d in det.feed(stream[start + lead:end]):
            first.setdefault(d.keyword, d.timestamp_ms * SAMPLE_RATE // 1000 - lead)
        scenes.append({"first": first, "peaks": dict(det.max_scores), "lead_alarms": lead_alarms})
    return {"costs": costs, "scenes": scenes}


def peer(audio_file: Path) -> dict:
    cfg = {
        "heads": [str(resolve_pkg_url(f"pkg://openwakeword/resources/models/{h}.onnx")) for h in HEADS],
        "mel": str(resolve_pkg_url("pkg://openwakeword/resources/models/melspectrogram.onnx")),
        "emb": str(resolve_pkg_url("pkg://openwakeword/resources/models/embedding_model.onnx")),
        "audio": str(audio_file), "chunks": CHUNKS, "repeats": REPEATS, "threshold": THRESHOLD,
        "lead_steps": LEAD_STEPS,
    }
    out = subprocess.run([PEER_PYTHON, "-c", PEER_SCRIPT, json.dumps(cfg)], check=True, capture_output=True,
                         text=True, cwd=tempfile.gettempdir())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["costs"] = {int(k): v for k, v in result["costs"].items()}
    result["scenes"] = [{"first": {display_name(k): v for k, v in s["first"].items()},
                         "peaks": {display_name(k): v for k, v in s["peaks"].items()},
                         "lead_alarms": s["lead_alarms"]} for s in result["scenes"]]
    return result


def delays(result: dict, scenes: list[wakeaudio.Scene]) -> tuple[list[float], int]:
    """Seconds from the end of the wake phrase to its detection, and how many positives were detected."""
    out = []
    for scene, found in zip(scenes, result["scenes"]):
        keyword = scene.label.split("|")[0]
        if keyword in found["first"]:
            end = scene.speech[0][1]
            out.append(found["first"][keyword] / SAMPLE_RATE - end)
    return out, len(out)


def main() -> None:
    if not Path(PEER_PYTHON).exists():
        sys.exit(f"peer interpreter {PEER_PYTHON} not found: see this file's docstring")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        positives = wakeaudio.positive_scenes(folder)
        negatives = wakeaudio.negative_scenes(folder) + wakeaudio.noise_scenes()
        scenes = positives + negatives
        # Each scene starts with 2.4 s of the same low noise, so that both pipelines' first 1.3 s (which
        # differ only by the noise each warms its buffers with) never reach the phrase and scores compare.
        rng = np.random.default_rng(99)
        lead = np.clip(rng.normal(0, wakeaudio.NOISE_RMS, LEAD_STEPS * STEP_SAMPLES), -32768, 32767).astype(np.int16)
        clips = [np.concatenate((lead, s.pcm)) for s in scenes]
        stream = np.concatenate(clips)
        offsets = np.cumsum([0] + [len(c) for c in clips])
        bounds = [(int(offsets[i]), int(offsets[i + 1])) for i in range(len(scenes))]
        audio_file = folder / "audio.npz"
        np.savez(audio_file, stream=stream, bounds=np.array(bounds))
        seconds = len(stream) / SAMPLE_RATE

        ref = peer(audio_file)
        mine = {phases: ours(stream, bounds, phases) for phases in (1, 2)}

    print(f"kws benchmark: {seconds:.1f} s of audio ({len(positives)} wake phrases, {len(negatives)} negative "
          f"scenes), heads {', '.join(HEADS)}, best of {REPEATS}")
    print()
    print(f"{'metric':44s} {'unitbus':>10s} {'2 grids':>10s} {'openwakeword':>13s} {'ratio':>7s} {'2 grids':>8s}")
    for chunk in CHUNKS:
        a, a2 = (mine[p]["costs"][chunk] / seconds * 1000 for p in (1, 2))
        b = ref["costs"][chunk] / seconds * 1000
        print(f"{f'cost ms per s of audio, {chunk}-sample chunks':44s} {a:10.2f} {a2:10.2f} {b:13.2f} "
              f"{a / b:6.2f}x {a2 / b:7.2f}x")
    n_pos = len(positives)
    (d_mine, hit_mine), (d_two, hit_two) = (delays(mine[p], positives) for p in (1, 2))
    d_ref, hit_ref = delays(ref, positives)
    print(f"{'positives detected':44s} {f'{hit_mine}/{n_pos}':>10s} {f'{hit_two}/{n_pos}':>10s} {f'{hit_ref}/{n_pos}':>13s}")
    for label, fn in (("median", np.median), ("max", np.max)):
        a, a2, b = fn(d_mine) * 1000, fn(d_two) * 1000, fn(d_ref) * 1000
        print(f"{f'{label} delay, end of phrase -> detection (ms)':44s} {a:10.0f} {a2:10.0f} {b:13.0f}")

    def false_alarms(result: dict) -> int:
        return sum(len(s["first"]) for s in result["scenes"][n_pos:]) + sum(s["lead_alarms"] for s in result["scenes"])

    print(f"{'false alarms (negative scenes, noise leads)':44s} {false_alarms(mine[1]):10d} "
          f"{false_alarms(mine[2]):10d} {false_alarms(ref):13d}")
    diff = max(abs(m["peaks"][k] - r["peaks"][k]) for m, r in zip(mine[1]["scenes"], ref["scenes"]) for k in m["peaks"])
    print(f"{'max |peak score difference| per scene':44s} {diff:10.4f}")
    print()
    print("cost target: <= 0.5x the library")


if __name__ == "__main__":
    main()
