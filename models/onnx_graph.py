"""Graph surgery the ONNX rewrites in models/ share (onnx package protos)."""
from __future__ import annotations


def replace_nodes(graph, nodes: list, new_initializers: list) -> None:
    """Give `graph` these nodes, add the new initializers and drop those no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
