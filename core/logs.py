"""Logging set-up for process entry points (only __main__ modules call it)."""
from __future__ import annotations

import logging
import sys


def configure(level: str = "INFO", name: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s {name + ' ' if name else ''}%(levelname)s %(name)s: %(message)s",
    )
