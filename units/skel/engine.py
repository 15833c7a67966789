"""The skel unit's "model": text transformations. A template for engines: plain functions, no bus."""
from __future__ import annotations

import re

MODES = ("upper", "lower", "reverse", "echo")


def transform(text: str, mode: str) -> str:
    if mode == "upper":
        return text.upper()
    if mode == "lower":
        return text.lower()
    if mode == "reverse":
        return text[::-1]
    return text


def pieces(text: str) -> list[str]:
    """Split text into word-sized deltas (words keep their following whitespace)."""
    return re.findall(r"\S+\s*|\s+", text)
