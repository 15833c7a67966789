from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from support import Stack


@pytest.fixture
def stack_factory(tmp_path):
    """Start `unitbus up` stacks; each is stopped at the end and must exit cleanly."""
    stacks: list[Stack] = []

    def start(units=("skel",), settings=None, config=None, env=None, timeout=120.0) -> Stack:
        stack = Stack(tmp_path / f"stack{len(stacks)}", list(units), settings, config, env)
        stacks.append(stack)
        return stack.start(timeout)

    yield start
    for stack in stacks:
        stack.stop()


@pytest.fixture
def skel_stack(stack_factory):
    return stack_factory(["skel"], {"skel.max_tasks": "4"})


@pytest.fixture
def pty_pair(tmp_path):
    """Two linked ptys from socat: the board end for the bridge, the MCU end for the test."""
    if shutil.which("socat") is None:
        pytest.fail("socat is required (apt-get install socat)")
    board, mcu = tmp_path / "ttyBOARD", tmp_path / "ttyMCU"
    proc = subprocess.Popen(["socat", f"pty,raw,echo=0,link={board}", f"pty,raw,echo=0,link={mcu}"])
    for _ in range(100):
        if board.exists() and mcu.exists():
            break
        time.sleep(0.05)
    yield board, mcu
    proc.terminate()
    proc.wait(5)
