"""`unitbus call`, `unitbus install-systemd` and the unit files (spec §19)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.e2e


def unitbus(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from core.cli import main; main()", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_call_prints_replies_and_streams(skel_stack):
    run_dir = str(skel_stack.run_dir)
    ping = unitbus("call", "--run-dir", run_dir, '{"request_id":"1","work_id":"sys","action":"ping"}')
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["error"]["code"] == 0
    pretty = unitbus("call", "--run-dir", run_dir, "sys", "version", "--pretty")
    assert json.loads(pretty.stdout)["data"] == "v1.6" and "\n  " in pretty.stdout
    setup = unitbus("call", "--run-dir", run_dir, "skel", "setup", "--data",
                    '{"model":"skel","response_format":"skel.utf-8.stream"}')
    work_id = json.loads(setup.stdout)["work_id"]
    stream = unitbus("call", "--run-dir", run_dir, work_id, "inference", "--object", "skel.utf-8", "--data", "two words")
    chunks = [json.loads(line) for line in stream.stdout.splitlines()]
    assert chunks[-1]["data"]["finish"] is True
    assert "".join(c["data"]["delta"] for c in chunks) == "TWO WORDS"
    failed = unitbus("call", "--run-dir", run_dir, "sys", "lsmod")
    assert failed.returncode == 1 and json.loads(failed.stdout)["error"]["code"] == -3


def test_call_without_a_stack_says_so(tmp_path):
    result = unitbus("call", "--run-dir", str(tmp_path), "sys", "ping", "--timeout", "1")
    assert result.returncode == 3 and "unitbus up" in result.stderr


def test_systemd_units_verify_clean(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is required (apt-get install systemd)")
    result = unitbus("install-systemd", "--target", str(tmp_path), "--executable", shutil.which("true") or "/bin/true")
    assert result.returncode == 0, result.stderr
    shutil.copy(tmp_path / "unitbus-unit@.service", tmp_path / "unitbus-unit@llm.service")
    files = [str(tmp_path / n) for n in ("unitbus-sys.service", "unitbus-bridge.service", "unitbus-http.service",
                                         "unitbus-wyoming.service", "unitbus-fleet.service", "unitbus-nats.service",
                                         "unitbus-unit@llm.service")]
    verify = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True)
    assert verify.stderr == "", verify.stderr
    text = (tmp_path / "unitbus-unit@llm.service").read_text()
    for setting in ("Type=notify", "WatchdogSec=30", "Restart=always", "Requires=unitbus-sys.service",
                    "PartOf=unitbus-sys.service", "NoNewPrivileges=yes", "User=unitbus", "RuntimeDirectoryMode=0700"):
        assert setting in text
    assert (tmp_path / "unitbus.conf").read_text().count("u unitbus ") == 1  # staged, nothing created


def test_install_systemd_creates_the_user_the_services_run_as(tmp_path):
    if shutil.which("systemd-sysusers") is None:
        pytest.fail("systemd-sysusers is required (apt-get install systemd)")
    result = unitbus("install-systemd", "--root", str(tmp_path), "--executable", "/usr/bin/unitbus")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "etc/systemd/system/unitbus-sys.service").is_file()
    assert (tmp_path / "etc/sysusers.d/unitbus.conf").is_file()
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert users["unitbus"][5] == "/var/lib/unitbus" and users["unitbus"][6].endswith("nologin")
    groups = {line.split(":")[0]: line.split(":")[3].split(",")
              for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert "unitbus" in groups["audio"] and "unitbus" in groups["dialout"]
    again = unitbus("install-systemd", "--root", str(tmp_path), "--executable", "/usr/bin/unitbus")
    assert again.returncode == 0, again.stderr  # idempotent
    assert [line.split(":")[0] for line in (tmp_path / "etc/passwd").read_text().splitlines()].count("unitbus") == 1
