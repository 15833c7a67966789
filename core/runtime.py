"""onnxruntime sessions: the one place engines get a session from.

onnxruntime is imported lazily so that the bus, the bridge and the CLI start without it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

DEFAULT_THREADS = int(os.environ.get("UNITBUS_THREADS", "0")) or min(2, os.cpu_count() or 1)


def choose_providers(available: Sequence[str], wanted: Sequence[str] | None = None) -> list[str]:
    """Pick execution providers: the wanted ones that exist, in order, always ending with CPU."""
    order = list(wanted) if wanted else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in order if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def create_session(
    model: str | Path | bytes,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    options: dict[str, str] | None = None,
) -> Any:
    """An InferenceSession with a fixed thread count and all graph optimisations.

    `threads` is the intra-op thread count (default: UNITBUS_THREADS or min(2, cores)); inter-op
    parallelism stays at 1 because unit graphs are sequential and extra pools only add contention.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or DEFAULT_THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    for key, value in (options or {}).items():
        so.add_session_config_entry(key, value)
    chosen = choose_providers(ort.get_available_providers(), providers)
    source = model if isinstance(model, bytes) else str(model)
    log.debug("onnxruntime session %s on %s with %d threads", "<bytes>" if isinstance(model, bytes) else model, chosen, so.intra_op_num_threads)
    return ort.InferenceSession(source, sess_options=so, providers=chosen)
