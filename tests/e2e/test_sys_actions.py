"""The sys actions that are off by default, once enabled in unitbus.toml (spec §7.5-§7.9), and readiness."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

import pytest

from support import REPO, StackFlowClient

pytestmark = pytest.mark.e2e


@pytest.fixture
def open_stack(stack_factory, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    config = tmp_path / "unitbus.toml"
    config.write_text(
        '[sys]\nallow = ["bashexec", "push", "pull", "unit_call", "update", "rmmode"]\n'
        f'file_roots = ["{files}"]\nupdate_dir = "{tmp_path}"\n'
        f'[models]\nmanifest_dir = "{tmp_path / "models"}"\n'
    )
    return stack_factory(["skel"], config=str(config)), files


def test_bashexec_plain_and_streamed(open_stack):
    stack, _ = open_stack
    with StackFlowClient(stack.port) as c:
        out = c.request({"request_id": "10", "work_id": "sys", "action": "bashexec", "object": "sys.utf-8", "data": "echo hi"})
        assert out["data"] == "hi\r\n" and out["object"] == "sys.utf-8"
        c.send({"request_id": "9", "work_id": "sys", "action": "bashexec", "object": "sys.utf-8.stream",
                "data": {"index": 0, "delta": "printf 'a%.0s' $(seq 1 600)", "finish": True}})
        ack = c.read_for("9")
        assert ack["error"]["code"] == 0 and ack["data"] == "None"
        chunks = c.stream("9")
        assert chunks[-1]["data"] == {"delta": "", "finish": True, "index": len(chunks) - 1}
        assert all(len(ch["data"]["delta"].encode()) <= 511 for ch in chunks)
        assert "".join(ch["data"]["delta"] for ch in chunks) == "a" * 600


def test_push_and_pull_inside_file_roots_only(open_stack):
    stack, files = open_stack
    target = files / "hello.txt"
    with StackFlowClient(stack.port) as c:
        pushed = c.request({"request_id": "11", "work_id": "sys", "action": "push",
                            "object": f"sys.base64.file.{target}", "data": "aGVsbG8K"})
        assert pushed["error"]["message"] == "sha256:" + hashlib.sha256(b"hello\n").hexdigest()
        assert target.read_bytes() == b"hello\n"
        # Streamed push: no reply to the middle chunks, one with the digest at the end.
        c.send({"request_id": "s", "work_id": "sys", "action": "push", "object": f"sys.stream.file.{files}/two.txt",
                "data": {"index": 0, "delta": "ab", "finish": False}})
        c.send({"request_id": "s", "work_id": "sys", "action": "push", "object": f"sys.stream.file.{files}/two.txt",
                "data": {"index": 1, "delta": "cd", "finish": True}})
        assert c.read_for("s")["error"]["message"] == "sha256:" + hashlib.sha256(b"abcd").hexdigest()
        pulled = c.request({"request_id": "12", "work_id": "sys", "action": "pull", "object": f"sys.stream.file.{target}"})
        assert pulled["data"] == {"delta": "aGVsbG8K", "finish": False, "index": 0}
        assert c.read_for("12")["data"] == {"delta": "", "finish": True, "index": 1}
        outside = c.request({"request_id": "13", "work_id": "sys", "action": "push", "object": "sys.file./etc/passwd", "data": "x"})
        assert outside["error"]["code"] == -17
        sneaky = c.request({"request_id": "14", "work_id": "sys", "action": "pull", "object": f"sys.file.{files}/../../etc/passwd"})
        assert sneaky["error"]["code"] == -17
        missing = c.request({"request_id": "15", "work_id": "sys", "action": "pull", "object": f"sys.file.{files}/nope"})
        assert missing["error"] == {"code": -17, "message": "file does not exist."}
        bad = c.request({"request_id": "16", "work_id": "sys", "action": "push", "object": f"sys.base64.file.{target}", "data": "@@"})
        assert bad["error"]["code"] == -23


def test_unit_call_update_and_rmmode(open_stack, tmp_path):
    stack, _ = open_stack
    (tmp_path / "llm_update_llm-0.3.1.deb").write_bytes(b"")
    with StackFlowClient(stack.port) as c:
        call = c.request({"request_id": "16", "work_id": "sys", "action": "unit_call", "object": "skel.taskinfo", "data": "None"})
        assert call["data"] == [] and call["object"] == "skel.taskinfo" and call["work_id"] == "sys"
        assert c.request({"request_id": "u", "work_id": "sys", "action": "unit_call", "object": "nope.x"})["error"]["code"] == -9
        update = c.request({"request_id": "13", "work_id": "sys", "action": "update"})
        assert update["data"] == f"{tmp_path}/llm_update_llm-0.3.1.deb\n"
        invalid = c.request({"request_id": "r", "work_id": "sys", "action": "rmmode", "data": "x; rm -rf /"})
        assert invalid["error"]["code"] == -2
        models = tmp_path / "models"
        models.mkdir()
        (models / "mode_gone.json").write_text("{}")
        removed = c.request({"request_id": "r2", "work_id": "sys", "action": "rmmode", "data": "gone"})
        assert removed["error"]["code"] == 0 and not (models / "mode_gone.json").exists()


def test_token_protects_enabled_actions(stack_factory, tmp_path):
    config = tmp_path / "t.toml"
    config.write_text('[sys]\nallow = ["bashexec"]\ntoken = "s3cret"\n')
    stack = stack_factory(["skel"], config=str(config))
    with StackFlowClient(stack.port) as c:
        denied = c.request({"request_id": "1", "work_id": "sys", "action": "bashexec", "data": "echo x"})
        assert denied["error"] == {"code": -31, "message": "unauthorized"}
        allowed = c.request({"request_id": "2", "work_id": "sys", "action": "bashexec", "data": "echo x", "token": "s3cret"})
        assert allowed["data"] == "x\r\n"


def test_sys_process_sends_ready_to_systemd(tmp_path):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "UNITBUS_CONFIG": str(tmp_path / "none.toml")}
    proc = subprocess.Popen([sys.executable, "-m", "core.sys", "--set", f"bus.run_dir={tmp_path}/run"], cwd=REPO, env=env)
    try:
        message = sock.recv(4096).decode()
        assert message.startswith("READY=1")
        assert (tmp_path / "run" / "sys.sock").exists()  # ready only once the socket is bound
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        sock.close()
