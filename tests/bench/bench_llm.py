"""LLM engine against llama-cpp-python on the same GGUF, same thread count, measured in the same run.

    python tests/bench/bench_llm.py [--peer-python /tmp/peer-llama/bin/python] [--tokens 128]

Each side runs in a fresh process (so resident memory is that of the model alone), greedy, with the end
token banned so both generate exactly --tokens tokens:
- time to first token: prompt ids in -> first new token id out (a ~40-token chat prompt);
- decode tok/s: the following tokens, through the engine's public generate() for unitbus;
- RSS: resident memory of the process after loading and generating.
The best of --rounds fresh processes per side is reported (the machine is shared and noisy).
Before the table it prints the CPU, the flags that pick each side's kernels (avx2, avx512f, avx512_vnni,
avx_vnni), which kernels each side ran (onnxruntime: the MatMulNBits bits / block size / accuracy level
of the converted graph and the MLAS dispatch those flags select; llama.cpp: its system_info), so a run on
another machine can be read against this one.
llama-cpp-python is only a peer: build it in a throwaway venv
(`python -m venv /tmp/peer-llama && /tmp/peer-llama/bin/pip install llama-cpp-python`), never here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "models" / "mode_smollm2-135m-instruct.json"
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWrite a long story about a small robot who learns to paint the sea.<|im_end|>\n"
          "<|im_start|>assistant\n")


def rss_mb() -> tuple[float, float]:
    status = Path("/proc/self/status").read_text()
    value = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM"))}
    return value["VmRSS"] / 1024, value["VmHWM"] / 1024


CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni")


def cpu_facts() -> tuple[str, set[str]]:
    """The CPU's model name and its flags from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags


def mlas_dispatch(flags: set[str]) -> str:
    """The MatMulNBits kernel family onnxruntime's MLAS picks on these flags (its platform.cpp order:
    AVX-512 F/BW/DQ/VL, then with AVX512-VNNI the VNNI one; else AVX-VNNI; else AVX2)."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "Avx512vnni" if "avx512_vnni" in flags else "Avx512"
    if "avx_vnni" in flags:
        return "Avx2vnni"
    return "Avx2" if "avx2" in flags else "none (SSE)"


def graph_kernels(model_dir: Path) -> str:
    """MatMulNBits nodes of the converted graph by (bits, block size, accuracy level), other op counts."""
    import collections

    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    nbits: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    for node in model.graph.node:
        ops[node.op_type] += 1
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            nbits[f"{a['bits']}-bit block {a['block_size']} accuracy_level {a.get('accuracy_level', 0)}"] += 1
    return (", ".join(f"{n} x {k}" for k, n in sorted(nbits.items())) + f"; {len(model.graph.node)} nodes ("
            + ", ".join(f"{op} {n}" for op, n in ops.most_common(6)) + ")")


def child_unitbus(gguf: str, threads: int, tokens: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from units.llm.engine import load_llm
    from units.llm.sampler import Sampler

    t0 = time.perf_counter()
    engine = load_llm({"gguf": gguf, "threads": threads})
    load_s = time.perf_counter() - t0
    ids = engine.encode(PROMPT)
    ban = {i: -1e9 for i in engine.stop_ids}
    ttft, tps = [], []
    for _ in range(repeats + 1):  # the first run warms up
        gen = engine.generate(ids, Sampler(temperature=0.0, logit_bias=ban), tokens)
        for _ in gen:
            pass
        assert len(gen.tokens) == tokens, gen.finish_reason
        ttft.append(gen.usage.prompt_ms)
        tps.append((len(gen.tokens) - 1) / (gen.usage.decode_ms / 1000.0))
    rss, peak = rss_mb()
    import onnxruntime

    kernels = (f"onnxruntime {onnxruntime.__version__}, MLAS {mlas_dispatch(cpu_facts()[1])} dispatch; "
               + graph_kernels(engine.model_dir))
    return {"prompt_tokens": len(ids), "ttft_ms": sorted(ttft[1:])[len(ttft[1:]) // 2],
            "decode_tps": sorted(tps[1:])[len(tps[1:]) // 2], "rss_mb": rss, "peak_mb": peak, "load_s": load_s,
            "kernels": kernels}


def child_peer(gguf: str, threads: int, tokens: int, repeats: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    eos = llm.token_eos()
    ttft, tps = [], []
    for _ in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        logits = np.array(llm.scores[llm.n_tokens - 1])
        logits[eos] = -1e9
        token = int(logits.argmax())
        t1 = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([token])
            logits = np.array(llm.scores[llm.n_tokens - 1])
            logits[eos] = -1e9
            token = int(logits.argmax())
        t2 = time.perf_counter()
        ttft.append((t1 - t0) * 1000)
        tps.append((tokens - 1) / (t2 - t1))
    rss, peak = rss_mb()
    import llama_cpp

    kernels = f"llama-cpp-python {llama_cpp.__version__}; " + llama_cpp.llama_print_system_info().decode().strip()
    return {"prompt_tokens": len(ids), "ttft_ms": sorted(ttft[1:])[len(ttft[1:]) // 2],
            "decode_tps": sorted(tps[1:])[len(tps[1:]) // 2], "rss_mb": rss, "peak_mb": peak, "load_s": load_s,
            "kernels": kernels}


def print_machine(ours: dict, peer: dict) -> None:
    """The CPU, its kernel-selecting flags and what each side ran (one line each)."""
    model, flags = cpu_facts()
    have = ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
    print(f"cpu: {model}, {os.cpu_count()} cores; {have}; load average {os.getloadavg()[0]:.1f}")
    print(f"unitbus kernels: {ours['kernels']}")
    print(f"llama.cpp kernels: {peer['kernels']}")


def run_child(python: str, side: str, args: argparse.Namespace, gguf: str, script: str = __file__) -> dict:
    """Run one side in a fresh process of `python` (the peer lives in its own venv); its last line is JSON."""
    cmd = [python, script, "--child", side, "--gguf", gguf, "--threads", str(args.threads),
           "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{side} benchmark failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peer_arguments(description: str, repeats_help: str) -> argparse.ArgumentParser:
    """The options both llama.cpp comparisons take, including the hidden ones of a child process."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", default=os.environ.get("UNITBUS_PEER_LLAMA_PYTHON", "/tmp/peer-llama/bin/python"),
                    help="python of a venv with llama-cpp-python (env UNITBUS_PEER_LLAMA_PYTHON)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help=repeats_help)
    ap.add_argument("--child", choices=("unitbus", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    return ap


def ran_as_child(args: argparse.Namespace, unitbus_side, peer_side) -> bool:
    """In a child process: measure its side, print the JSON line run_child reads, and say so."""
    if not args.child:
        return False
    side = unitbus_side if args.child == "unitbus" else peer_side
    print(json.dumps(side(args.gguf, args.threads, args.tokens, args.repeats)))
    return True


def converted_gguf() -> str:
    """The SmolLM2 GGUF's path, converted beforehand: conversion is a one-time cost, not measured."""
    sys.path.insert(0, str(ROOT))
    from core.paths import resolve_pkg_url
    from models.gguf_llama import convert_manifest

    manifest = json.loads(MANIFEST.read_text())
    convert_manifest(manifest)
    return str(resolve_pkg_url(manifest["mode_param"]["gguf"]))


def main() -> None:
    ap = peer_arguments(__doc__, "measured generations per process (median)")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per side (best)")
    args = ap.parse_args()
    if ran_as_child(args, child_unitbus, child_peer):
        return
    gguf = converted_gguf()
    ours, peer = [], []
    for _ in range(args.rounds):
        ours.append(run_child(sys.executable, "unitbus", args, gguf))
        peer.append(run_child(args.peer_python, "peer", args, gguf))

    def best(runs: list[dict], key: str, high: bool) -> float:
        values = [r[key] for r in runs]
        return max(values) if high else min(values)

    rows = [
        ("decode tok/s (higher is better)", "decode_tps", True, ">= 1.2x"),
        (f"time to first token, {ours[0]['prompt_tokens']}-token prompt (ms)", "ttft_ms", False, "<= 0.5x"),
        ("resident memory after generating (MB)", "rss_mb", False, "<= 1.2x"),
        ("peak resident memory (MB)", "peak_mb", False, ""),
        ("load time (s)", "load_s", False, ""),
    ]
    print_machine(ours[0], peer[0])
    print(f"SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.tokens} greedy tokens, "
          f"best of {args.rounds} processes x median of {args.repeats} runs")
    print(f"{'metric':48s} {'unitbus':>10s} {'llama.cpp':>10s} {'ratio':>7s}  target")
    for label, key, high, target in rows:
        a, b = best(ours, key, high), best(peer, key, high)
        print(f"{label:48s} {a:10.1f} {b:10.1f} {a / b:6.2f}x  {target}")


if __name__ == "__main__":
    main()
