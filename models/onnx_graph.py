"""Graph surgery and saving that the ONNX conversions in models/ share (onnx package protos)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

# Page-aligned offsets let onnxruntime memory-map the external data instead of reading it into the heap.
_ALIGN = 4096
_SMALL_INITIALIZER = 1024


def save_with_external_data(model: Any, path: Path) -> None:
    """`path` (the graph) and `path`.data (its initializers of 1 kB and more, each page-aligned).

    onnxruntime memory-maps such a data file: weights its kernels repack are unmapped after the repack,
    and those read as they are (a token table) cost only the pages touched, which the kernel can drop
    again, instead of a heap copy of the whole file."""
    from onnx import TensorProto

    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as f:
        for tensor in model.graph.initializer:
            if len(tensor.raw_data) < _SMALL_INITIALIZER:
                continue
            offset = f.tell() + (-f.tell()) % _ALIGN
            f.write(b"\0" * (offset - f.tell()))
            f.write(tensor.raw_data)
            length = len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
    path.write_bytes(model.SerializeToString())


def replace_nodes(graph, nodes: list, new_initializers: list) -> None:
    """Give `graph` these nodes, add the new initializers and drop those no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
