from __future__ import annotations

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
