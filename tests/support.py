"""Helpers for black-box tests: start a real stack, speak StackFlow to it over a real socket."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def espeak_wav(text: str, out: Path, voice: str = "en-us", speed: int = 150) -> Path:
    """Speech from the espeak-ng program, resampled by sox to a 16 kHz mono 16-bit WAV at `out`.
    sox's random dither is off (-D): the same text gives the same samples in every run, so a test's
    scenes (placed with seeded noise after the speech's trimmed length) are the same from run to run."""
    raw = out.with_name(out.stem + ".raw.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), "-v", voice, "-s", str(speed), text], check=True, capture_output=True)
    subprocess.run(["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out)], check=True,
                   capture_output=True)
    raw.unlink()
    return out


def espeak_pcm(text: str, folder: Path, voice: str = "en-us", speed: int = 150):
    """int16 samples of espeak_wav(), kept in `folder` so the same sentence is synthesized once."""
    import wave

    import numpy as np

    stem = f"{voice}_{speed}_{hashlib.sha1(text.encode()).hexdigest()[:10]}".replace("+", "_")
    out = Path(folder) / f"{stem}.wav"
    if not out.exists():
        espeak_wav(text, out, voice, speed)
    with wave.open(str(out)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def trim_silence(pcm, level: int = 200):
    """Cut leading and trailing samples quieter than `level`, so where speech starts and ends is known."""
    import numpy as np

    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > level)
    return pcm[loud[0]:loud[-1] + 1]


def word_edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level edit distance (substitutions, insertions, deletions) for word error rates."""
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hypothesis, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Stack:
    """`unitbus up` as a child process, on its own port and run directory."""

    def __init__(self, tmp: Path, units: list[str], settings: dict[str, Any] | None = None,
                 config: str | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.run_dir = tmp / "run"
        self.units = units
        self.settings = {"up.http": "false", "up.wyoming": "false", **(settings or {})}
        self.config = config
        self.env = {**os.environ, "UNITBUS_CONFIG": config or str(tmp / "absent.toml"), **(env or {})}
        self.output: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'sys.sock'}"

    def start(self, timeout: float = 120.0) -> "Stack":
        argv = [sys.executable, "-c", "from core.cli import main; main()", "up", "--run-dir", str(self.run_dir),
                "--port", str(self.port), "--units", *self.units]
        for key, value in self.settings.items():
            argv += ["--set", f"{key}={value}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=REPO, text=True, bufsize=1)
        threading.Thread(target=self._read_output, daemon=True).start()
        if not self._ready.wait(timeout):
            self.stop(check=False)
            raise RuntimeError("stack did not come up:\n" + "".join(self.output[-60:]))
        if str(self.settings.get("uart.enabled", "")).lower() == "true":
            # "unitbus up:" waits for TCP and the units; the bridge may open the UART a moment later, and
            # what an MCU wrote before that is not read. Wait for the port to be open.
            deadline = time.monotonic() + timeout
            while not any("StackFlow UART on" in line for line in self.output):
                if time.monotonic() > deadline:
                    raise RuntimeError("the UART never opened:\n" + "".join(self.output[-60:]))
                time.sleep(0.02)
        return self

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("unitbus up:"):
                self._ready.set()

    def pid_of(self, unit: str) -> int:
        """pid of the child running `python -m units.<unit>` (or core.sys / firmware_bridge)."""
        module = {"sys": "core.sys", "bridge": "firmware_bridge"}.get(unit, f"units.{unit}")
        assert self.proc is not None
        for pid in child_pids(self.proc.pid):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if module.encode() in cmd and alive(pid):
                return pid
        raise LookupError(f"no running {unit} process")

    def log(self) -> str:
        return "".join(self.output)

    def stop(self, check: bool = True) -> int:
        if self.proc is None:
            return 0
        children = child_pids(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        leftovers = [p for p in children if alive(p)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        if check:
            assert code == 0, f"unitbus up exited with {code}\n{self.log()[-4000:]}"
            assert not leftovers, f"processes left running: {leftovers}"
        return code


class StackFlowClient:
    """A script-like client on TCP 10001: sends JSON, reads one message per line."""

    def __init__(self, port: int, timeout: float = 30.0, source: tuple[str, int] | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=source)
        self.timeout = timeout
        self.buffer = b""
        self.backlog: list[dict] = []
        self.raw_lines: list[bytes] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "StackFlowClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, message: dict | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message, ensure_ascii=False).encode()
        self.sock.sendall(data)

    def read_line(self, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message within {timeout or self.timeout} s; have {self.buffer[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        self.raw_lines.append(line + b"\n")
        return line + b"\n"

    def read(self, timeout: float | None = None) -> dict:
        if self.backlog:
            return self.backlog.pop(0)
        return json.loads(self.read_line(timeout))

    def read_for(self, request_id: str, timeout: float | None = None) -> dict:
        for i, message in enumerate(self.backlog):
            if message["request_id"] == request_id:
                return self.backlog.pop(i)
        while True:
            message = json.loads(self.read_line(timeout))
            if message["request_id"] == request_id:
                return message
            self.backlog.append(message)

    def request(self, message: dict, timeout: float | None = None) -> dict:
        self.send(message)
        return self.read_for(message["request_id"], timeout)

    def stream(self, request_id: str, timeout: float | None = None) -> list[dict]:
        """Messages of one request until a finish:true chunk or an error."""
        out = []
        while True:
            message = self.read_for(request_id, timeout)
            out.append(message)
            data = message["data"]
            if message["error"]["code"] != 0 or not isinstance(data, dict) or data.get("finish"):
                return out

    def expect_silence(self, seconds: float) -> None:
        try:
            line = self.read_line(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {line!r}")
