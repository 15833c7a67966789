"""The bus's processes leave out modules they never use: each one costs every process that imports it."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# ssl: asyncio's TLS transports, which these processes never open (core/notls.py); importlib.metadata: the
# entry points are read without it (core/registry.py); difflib: only a misspelt setting needs it.
LEFT_OUT = ["ssl", "importlib.metadata", "difflib"]
PROBE = """
import runpy, sys
runpy.run_module(sys.argv[1], run_name="imported")  # the process's own imports, without running it
from core.settings import Settings
Settings.load()
print(" ".join(name for name in sys.argv[2:] if sys.modules.get(name) is not None))
"""


@pytest.mark.parametrize("module, left_out", [
    *((module, LEFT_OUT) for module in ("core.sys", "firmware_bridge", "units.audio", "units.kws", "units.asr",
                                        "units.llm", "units.tts", "units.vad")),
    # FastAPI checks routes for pydantic.v1 models by importing it (firmware_bridge/http/nov1.py); its
    # starlette imports ssl and pydantic importlib.metadata.
    ("firmware_bridge.http", ["pydantic.v1", "difflib"]),
])
def test_a_process_does_not_import_what_it_never_uses(module: str, left_out: list[str], tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, module, *left_out], cwd=REPO, capture_output=True, text=True,
                         env={"UNITBUS_CONFIG": str(tmp_path / "absent.toml"), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []
