"""The streaming rewrite of openWakeWord's embedding model (models/openwakeword_stream.py)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from core.paths import resolve_pkg_url
from core.runtime import create_session
from models import openwakeword_stream as stream_graph
from models.cache import source_stamp

EMBEDDING = "pkg://openwakeword/resources/models/embedding_model.onnx"


def test_rejects_a_graph_that_is_not_the_embedding_model():
    source = resolve_pkg_url("pkg://openwakeword/resources/models/hey_jarvis_v0.1.onnx").read_bytes()
    with pytest.raises(ValueError):
        stream_graph.build(source)


def test_streaming_embeddings_equal_the_original_76_frame_windows(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITBUS_CACHE_DIR", str(tmp_path))
    source = resolve_pkg_url(EMBEDDING)
    path, caches = stream_graph.cached_build(source)
    stream = create_session(path, threads=1)
    original = create_session(source, threads=1)

    rng = np.random.default_rng(0)
    mel = rng.normal(1.0, 1.0, (8 * 30, 32)).astype(np.float32)
    state = {name: np.zeros(shape, np.float32) for name, _, shape in caches}
    stepwise = []
    for k in range(30):
        out = stream.run(None, {stream_graph.INPUT: mel[None, None, 8 * k:8 * k + 8], **state})
        stepwise.append(out[0][0])
        state = {name: out[1 + i] for i, (name, _, _) in enumerate(caches)}
    stepwise = np.array(stepwise)

    # Once 76 frames have been seen, step k's embedding is the original model on frames [8k+8-76, 8k+8).
    for k in range(9, 30):
        window = mel[8 * k + 8 - 76:8 * k + 8][None, :, :, None]
        expected = original.run(None, {"input_1": window})[0].reshape(96)
        np.testing.assert_allclose(stepwise[k], expected, rtol=1e-4, atol=1e-4)

    # Many steps in one call give the same embeddings as one step per call.
    zeros = {name: np.zeros(shape, np.float32) for name, _, shape in caches}
    batched = stream.run(None, {stream_graph.INPUT: mel[None, None], **zeros})[0]
    np.testing.assert_allclose(batched, stepwise, rtol=1e-5, atol=1e-5)


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITBUS_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "embedding_model.onnx"
    source.write_bytes(resolve_pkg_url(EMBEDDING).read_bytes())
    path, caches = stream_graph.cached_build(source)
    first_mtime = path.stat().st_mtime_ns
    again, caches_again = stream_graph.cached_build(source)
    assert again == path and caches_again == caches and path.stat().st_mtime_ns == first_mtime

    # The same file elsewhere, written later (the package in another checkout's virtualenv): reused.
    elsewhere = tmp_path / "other-venv" / source.name
    elsewhere.parent.mkdir()
    shutil.copyfile(source, elsewhere)
    os.utime(elsewhere, ns=(first_mtime + 10**9, first_mtime + 10**9))
    assert stream_graph.cached_build(elsewhere)[0].stat().st_mtime_ns == first_mtime

    # Another file under the same name and size (one byte changed at its end) has another stamp.
    changed = tmp_path / "changed" / source.name
    changed.parent.mkdir()
    content = bytearray(source.read_bytes())
    content[-1] ^= 0xFF
    changed.write_bytes(bytes(content))
    assert source_stamp([changed], 1) != source_stamp([source], 1) == source_stamp([elsewhere], 1)

    stamp_file = path.parent / "build.json"
    stamp = json.loads(stamp_file.read_text())
    stamp["sources"][source.name]["sha256"] = "0" * 64  # as if it had been built from another file
    stamp_file.write_text(json.dumps(stamp))
    rebuilt, _ = stream_graph.cached_build(source)
    assert json.loads((rebuilt.parent / "build.json").read_text())["sources"][source.name]["sha256"] != "0" * 64
    assert rebuilt.stat().st_mtime_ns != first_mtime
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp folders left
