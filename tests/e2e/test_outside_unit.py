"""A package from outside the tree (tests/e2e/outside_unit) is installed, its unit and its face found through
their entry points, started by `unitbus up`, and they answer over TCP: the unit's name, the name it serves,
its manifests and settings section, the face's section and port, with no edit to core (core/registry.py)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import StackFlowClient, free_port

pytestmark = pytest.mark.e2e

PACKAGE = Path(__file__).with_name("outside_unit")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outside")
    source, target = root / "source", root / "site"
    shutil.copytree(PACKAGE, source)  # pip builds in place: keep the build files out of the tree
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def environment(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))}


def test_the_outside_unit_is_started_and_answers(stack_factory, site):
    stack = stack_factory(["rot13"], {"rot13.shift": "13"}, env=environment(site))
    with StackFlowClient(stack.port) as client:
        listed = client.request({"request_id": "l", "work_id": "sys", "action": "lsmode"})
        assert "rot13" in [m["mode"] for m in listed["data"]]
        reply = client.request({"request_id": "s", "work_id": "caesar", "action": "setup", "data": {
            "model": "caesar-13", "response_format": "rot13.utf-8.stream", "input": "rot13.utf-8", "enoutput": True}})
        assert reply["error"] == {"code": 0, "message": "model alias: caesar-13 -> rot13"}, reply
        work_id = reply["work_id"]
        assert work_id == "caesar.1000"
        client.send({"request_id": "i", "work_id": work_id, "action": "inference", "object": "rot13.utf-8",
                     "data": "Hello world"})
        chunks = client.stream("i")
        assert "".join(c["data"]["delta"] for c in chunks) == "Uryyb jbeyq "
        assert chunks[-1]["data"]["finish"] is True
        info = client.request({"request_id": "t", "work_id": "caesar", "action": "taskinfo"})
        assert info["error"]["code"] == 0 and work_id in info["data"]


def test_the_outside_units_settings_section_is_typed_and_used(stack_factory, site):
    stack = stack_factory(["rot13"], {"rot13.shift": "1"}, env=environment(site))
    with StackFlowClient(stack.port) as client:
        reply = client.request({"request_id": "s", "work_id": "rot13", "action": "setup", "data": {
            "model": "rot13", "response_format": "rot13.utf-8", "input": "rot13.utf-8", "enoutput": True}})
        assert reply["error"]["code"] == 0, reply
        client.send({"request_id": "i", "work_id": reply["work_id"], "action": "inference", "object": "rot13.utf-8",
                     "data": "abc"})
        assert client.read_for("i")["data"] == "bcd"
    result = subprocess.run([sys.executable, "-c", "from core.cli import main; main()", "call", "sys", "ping",
                             "--set", "rot13.shift=many"], capture_output=True, text=True,
                            env={**os.environ, **environment(site)}, cwd=Path(__file__).parents[2])
    assert result.returncode != 0 and "rot13.shift: expected an integer" in result.stderr


def test_the_outside_units_published_source_counts_its_subscribers(stack_factory, site):
    """sys keeps a subscriber count for every source a unit registers, not only the microphone's."""
    stack = stack_factory(["rot13"], {"rot13.max_tasks": "2"}, env=environment(site))
    with StackFlowClient(stack.port) as client:
        def listeners() -> dict:
            return client.request({"request_id": "n", "work_id": "rot13", "action": "listeners"})["data"]

        assert listeners() == {"rot13.words": 0}
        setup = {"model": "rot13", "response_format": "rot13.utf-8", "enoutput": True}
        source = client.request({"request_id": "s", "work_id": "rot13", "action": "setup",
                                 "data": {**setup, "input": "rot13.utf-8"}})["work_id"]
        listener = client.request({"request_id": "l", "work_id": "rot13", "action": "setup",
                                   "data": {**setup, "input": ["words.rot13"]}})
        assert listener["error"]["code"] == 0, listener
        assert listeners() == {"rot13.words": 1}
        client.send({"request_id": "i", "work_id": source, "action": "inference", "object": "rot13.utf-8",
                     "data": "abc"})
        assert client.read_for("i")["data"] == "nop"
        heard = client.read_for("l")  # the listener task's output: what it heard, rotated back
        assert (heard["work_id"], heard["data"]) == (listener["work_id"], "abc")
        client.request({"request_id": "e", "work_id": listener["work_id"], "action": "exit"})
        assert listeners() == {"rot13.words": 0}


def test_the_outside_face_is_started_with_its_section_and_reaches_the_unit(stack_factory, site):
    port = free_port()
    stack = stack_factory(["rot13"], {"up.rot13line": "true", "rot13line.port": str(port), "rot13.shift": "1"},
                          env=environment(site))
    # `unitbus up` waited for the face's port before it said it was up, and names it.
    assert f"rot13line on tcp 127.0.0.1:{port}" in stack.log()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        lines = sock.makefile("rwb")
        lines.write(b"abc\nHello\n")
        lines.flush()
        assert (lines.readline(), lines.readline()) == (b"bcd\n", b"Ifmmp\n")
    with StackFlowClient(stack.port) as client:  # the face's task is on the bus like any client's
        tasks = client.request({"request_id": "t", "work_id": "rot13", "action": "taskinfo"})["data"]
        assert tasks == ["rot13.1000"], tasks
    result = subprocess.run([sys.executable, "-c", "from core.cli import main; main()", "call", "sys", "ping",
                             "--set", "rot13line.prot=1"], capture_output=True, text=True,
                            env={**os.environ, **environment(site)}, cwd=Path(__file__).parents[2])
    assert result.returncode == 2 and "unknown setting rot13line.prot (did you mean rot13line.port?)" in result.stderr


def test_a_face_is_off_by_its_up_setting(stack_factory, site):
    stack = stack_factory(["rot13"], env=environment(site))  # rot13line starts only when up.rot13line is set
    assert "rot13line" not in stack.log() and "bridge on tcp" in stack.log()
