"""Every process's command line: a misspelled setting ends it with one line naming the closest key (exit
status 2), never a traceback, whichever process reads it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROCESSES = [("core.sys", "unitbus-sys"), ("units.vad", "unitbus-vad"), ("firmware_bridge", "unitbus-bridge"),
             ("firmware_bridge.http", "unitbus-http"), ("firmware_bridge.wyoming", "unitbus-wyoming"),
             ("firmware_bridge.fleet", "unitbus-fleet"), ("firmware_bridge.fleet.server", "unitbus-nats")]


@pytest.mark.parametrize("module,prog", PROCESSES)
def test_a_misspelled_setting_is_named_in_one_line(module, prog, tmp_path):
    result = subprocess.run([sys.executable, "-m", module, "--set", "bus.run_dri=/tmp/x"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"{prog}: command line: unknown setting bus.run_dri"
                                     " (did you mean bus.run_dir?)")


@pytest.mark.parametrize("module,prog", PROCESSES[:2])
def test_help_lists_the_common_options(module, prog):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {prog} [-h] [--config CONFIG]")
    assert "--set KEY=VALUE" in result.stdout
