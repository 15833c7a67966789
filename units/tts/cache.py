"""Voice files derived from a Piper voice (the exact rewrite, the int8 build), built once and cached,
and the graph surgery both builds share.

Each build lives in core.paths.cache_dir()/<name>/model.onnx beside a source.json stamp; it is
written to a temporary folder and renamed, so a crash never leaves half a model, and it is rebuilt
when the source file's size or mtime, or the builder's format version, changes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from core.paths import cache_dir


def _source_stamp(model: Path, version: int) -> dict:
    st = model.stat()
    return {"source": str(model), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": version}


def cached_build(model: Path, name: str, version: int, build: Callable[[Path], None]) -> Path:
    """Path of cache_dir()/<name>/model.onnx, made by `build(dest)` from `model` unless already current."""
    target = cache_dir() / name
    stamp = _source_stamp(model, version)
    meta = target / "source.json"
    if meta.is_file() and (target / "model.onnx").is_file():
        try:
            if json.loads(meta.read_text()) == stamp:
                return target / "model.onnx"
        except (OSError, ValueError):
            pass
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
    try:
        build(work / "model.onnx")
        (work / "source.json").write_text(json.dumps(stamp))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)  # stale build of an older source
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "model.onnx").is_file():  # another process won the race: use its build
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / "model.onnx"


def replace_nodes(graph, nodes: list, new_initializers: list) -> None:
    """Give `graph` these nodes, add the new initializers and drop those no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
