"""How an engine shares a loaded model: `share(key, loader)` returns the one model for key.

The unit base's shared_model keeps one per process (spec §18.4); tools and tests that load an engine
on its own pass nothing and get load_alone, so no engine keeps a module-level cache of its own.
"""
from __future__ import annotations

from typing import Any, Callable

Share = Callable[[Any, Callable[[], Any]], Any]


def load_alone(key: Any, loader: Callable[[], Any]) -> Any:
    return loader()
