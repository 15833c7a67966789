"""The bus's processes leave out modules they never use: each one costs every process that imports it."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# ssl: asyncio's TLS transports, which these processes never open (core/notls.py); importlib.metadata: the
# entry points are read without it (core/registry.py); difflib: only a misspelt setting needs it.
LEFT_OUT = {"ssl", "importlib.metadata", "difflib"}
PROBE = """
import runpy, sys
runpy.run_module(sys.argv[1], run_name="imported")  # the process's own imports, without running it
from core.settings import Settings
Settings.load()
print(" ".join(sorted(set(sys.argv[2:]) & set(sys.modules))))
"""


@pytest.mark.parametrize("module", ["core.sys", "firmware_bridge", "units.audio", "units.kws", "units.asr", "units.llm",
                                    "units.tts", "units.vad"])
def test_a_process_does_not_import_what_it_never_uses(module: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, module, *LEFT_OUT], cwd=REPO, capture_output=True, text=True,
                         env={"UNITBUS_CONFIG": str(tmp_path / "absent.toml"), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []
