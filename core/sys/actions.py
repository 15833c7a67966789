"""The sys.* actions of spec §7. Dangerous ones are off unless `[sys] allow` lists them."""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import glob
import hashlib
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from core import bus
from core.envelope import Request, Response, error_reply, reply, stream_data
from core.errors import FILE_MISSING, ErrorCode, UnitError
from core.ids import ObjectType
from core.manifest import ManifestStore
from core.streams import StreamAssembler, parse_chunk
from core.sys.fleet import FLEET_UNIT

if TYPE_CHECKING:
    from core.sys.broker import Broker, Origin, UnitRecord

    # An async do_* method: its final answer, or None when it answered itself.
    AsyncHandler = Callable[[Origin, Request, bytes | None], Awaitable[Response | None]]

log = logging.getLogger(__name__)

VERSION = "0.1.0"
SAFE = ("ping", "lsmode", "lstask", "lsunit", "hwinfo", "cmminfo", "axcl_cmminfo", "version", "version2", "uartsetup",
        "reset")
DANGEROUS = ("reboot", "bashexec", "push", "pull", "update", "upgrade", "rmmode", "unit_call")
PACKAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]*")
BAUD_RATES = {1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 500000, 576000,
              921600, 1000000, 1152000, 1500000, 2000000, 2500000, 3000000, 3500000, 4000000}
PARITY = {110: "n", 101: "e", 111: "o", "n": "n", "e": "e", "o": "o", "none": "n", "even": "e", "odd": "o"}
SHELL_CHUNK_BYTES = 511
RESET_WAIT_S = 12.0


class SysActions:
    def __init__(self, broker: "Broker"):
        self.broker = broker
        self.settings = broker.settings
        self.streams = StreamAssembler(int(self.settings["framing.max_stream_bytes"]),
                                       float(self.settings["timeouts.stream_idle_s"]))
        self._reset_done: set[bytes] = set()  # units that reset in place (no supervisor to restart them)

    # dispatch ----------------------------------------------------------------------------------
    def dispatch(self, origin: "Origin", request: Request, binary: bytes | None) -> None:
        action = request.action
        if action not in SAFE and action not in DANGEROUS:
            self.broker.answer_error(origin, request, ErrorCode.ACTION_MATCH)
            return
        if action in DANGEROUS:
            if action not in self.settings["sys.allow"]:
                self.broker.answer_error(origin, request, ErrorCode.ACTION_DISABLED,
                                         f"sys.{action} is off; enable it with [sys] allow in unitbus.toml")
                return
            token = self.settings["sys.token"]
            if token and request.token != token:
                self.broker.answer_error(origin, request, ErrorCode.UNAUTHORIZED)
                return
        handler = getattr(self, "do_" + action)
        if asyncio.iscoroutinefunction(handler):
            self.broker.spawn(self._run(handler, origin, request, binary))
        else:  # quick answers (ping, version, ...) go out at once, without a task
            with self._boundary(origin, request):
                self._send_result(origin, handler(origin, request, binary))

    async def _run(self, handler: "AsyncHandler", origin: "Origin", request: Request, binary: bytes | None) -> None:
        with self._boundary(origin, request):
            self._send_result(origin, await handler(origin, request, binary))

    def _send_result(self, origin: "Origin", result: Response | None) -> None:
        if isinstance(result, Response):
            self.broker.answer(origin, result)

    @contextlib.contextmanager
    def _boundary(self, origin: "Origin", request: Request) -> Iterator[None]:
        """The error boundary of sys actions: every request ends with an answer."""
        try:
            yield
        except UnitError as exc:
            self.broker.answer(origin, error_reply(request.request_id, "sys", exc))
        except Exception as exc:
            log.exception("sys.%s failed", request.action)
            self.broker.answer(origin, error_reply(request.request_id, "sys", ErrorCode.OPERATION_FAILED, str(exc)))

    def control_from_peer(self, identity: bytes, message: bus.Control) -> None:
        if message.op == "reset_done" and not (message.data or {}).get("restart"):
            self._reset_done.add(identity)

    # informational -----------------------------------------------------------------------------
    def do_ping(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        return reply(request, "sys")

    def do_lsmode(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        manifests = ManifestStore(self.settings).all()
        return reply(request, "sys", data=[m.data for m in manifests], object="sys.lsmode")

    def do_lstask(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        # The fleet bridge's link ends (sources imported from other boards) are not tasks of this board.
        tasks = sorted((t for t in self.broker.tasks.values() if FLEET_UNIT not in t.unit.names),
                       key=lambda t: int(t.work_id.rsplit(".", 1)[1]))
        data = [{**t.info, "work_id": t.work_id} for t in tasks]
        return reply(request, "sys", data=data, object="sys.lstask")

    def do_lsunit(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        now = time.monotonic()
        units = sorted(self.broker.workers.values(), key=lambda u: u.name)
        data = [{"unit": u.name, "names": u.names, "pid": u.pid, "version": u.version,
                 "tasks": sum(1 for t in self.broker.tasks.values() if t.unit is u),
                 "heartbeat_ms": int((now - u.last_seen) * 1000)} for u in units]
        return reply(request, "sys", data=data, object="sys.lsunit")

    async def do_hwinfo(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        load = await cpu_load_percent(1.0)
        data = {"cpu_loadavg": load, "eth_info": eth_info(), "mem": memory_percent(), "temperature": temperature()}
        return reply(request, "sys", data=data, object="sys.hwinfo")

    def do_cmminfo(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        total, available = meminfo_kib()
        data = {"remain": available, "total": total, "used": total - available}
        return reply(request, "sys", data=data, object="sys.cmminfo")

    do_axcl_cmminfo = do_cmminfo

    def do_version(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        return reply(request, "sys", data=self.settings["sys.api_version"], object="sys.utf-8")

    def do_version2(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        versions = {f"llm_{r.name}-{r.version}" for r in self.broker.workers.values()}
        versions.add(f"llm_sys-{VERSION}")
        return reply(request, "sys", data=sorted(versions), object="sys.utf-8.stream")

    # uartsetup and reset -----------------------------------------------------------------------
    async def do_uartsetup(self, origin: "Origin", request: Request, binary: bytes | None) -> Response | None:
        if not isinstance(request.data, dict):
            raise UnitError(ErrorCode.JSON_FORMAT, "uartsetup data must be an object")
        # Only the given keys go out: the bridge owning the port keeps the others as they are (§7.3).
        new = validate_uart(request.data)
        self.broker.answer(origin, reply(request, "sys"))
        await asyncio.sleep(0.1)  # reply on the old settings first (spec §7.3)
        for identity, client in list(self.broker.clients.items()):
            if "uart" in client.features:
                self.broker.send_to_client(identity, bus.Control("uartsetup", new))
        return None

    async def do_reset(self, origin: "Origin", request: Request, binary: bytes | None) -> None:
        self.broker.answer(origin, reply(request, "sys", message="llm server restarting ..."))
        broker = self.broker
        broker.cancel_all_inflight("sys.reset")
        for work_id in list(broker.tasks):
            broker.tasks.pop(work_id, None)
        broker.links.clear()
        broker.next_number = int(self.settings["work_id.start"])
        # Units under a supervisor (unitbus up, systemd) exit and start afresh; the others drop their
        # tasks in place. Either way "reset over" waits until every unit is back (spec §7.4).
        before = list(broker.workers.values())
        self._reset_done = set()
        for record in before:
            broker.send_to_unit(record, bus.Control("reset"))
        old = {record.identity for record in before}

        def back(record: "UnitRecord") -> bool:
            now = broker.units.get(record.name)
            return record.identity in self._reset_done or (now is not None and now.identity not in old)

        deadline = asyncio.get_running_loop().time() + RESET_WAIT_S
        while not all(back(r) for r in before) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        missing = [r.name for r in before if not back(r)]
        if missing:
            log.warning("reset: %s not back within %.0f s", ", ".join(missing), RESET_WAIT_S)
        notice = Response("0", "sys", message="reset over")
        for identity, client in list(broker.clients.items()):
            if "uart" in client.features:
                broker.send_to_client(identity, bus.Control("notice", notice.to_dict()))
        return None

    # dangerous ---------------------------------------------------------------------------------
    async def do_reboot(self, origin: "Origin", request: Request, binary: bytes | None) -> None:
        self.broker.answer(origin, reply(request, "sys", message="rebooting ..."))
        await asyncio.sleep(0.2)
        await run_program(["systemctl", "reboot"], timeout=30)
        return None

    async def do_bashexec(self, origin: "Origin", request: Request, binary: bytes | None) -> Response | None:
        streamed = ObjectType.parse(request.object).stream
        if streamed:
            command = self._collect(origin, request, ack=True)
            if command is None:
                return None
        else:
            if not isinstance(request.data, str):
                raise UnitError(ErrorCode.JSON_FORMAT, "bashexec data must be the command string")
            command = request.data
        output = await run_in_pty(["/bin/sh", "-c", command], float(self.settings["sys.shell_timeout_s"]))
        text = output.decode("utf-8", "replace")
        if not streamed:
            return reply(request, "sys", data=text, object="sys.utf-8")
        index = 0
        for chunk in split_utf8(output, SHELL_CHUNK_BYTES):
            self.broker.answer(origin, reply(request, "sys", data=stream_data(index, chunk, False),
                                             object="sys.utf-8.stream"), final=False)
            index += 1
        return reply(request, "sys", data=stream_data(index, "", True), object="sys.utf-8.stream")

    async def do_push(self, origin: "Origin", request: Request, binary: bytes | None) -> Response | None:
        flags, path = file_object(request.object)
        target = self._checked_path(path)
        content: str | bytes | None
        if "stream" in flags:
            content = self._collect(origin, request, ack=False)
            if content is None:
                return None
        elif binary is not None:
            content = binary
        else:
            if not isinstance(request.data, str):
                raise UnitError(ErrorCode.JSON_FORMAT, "push data must be a string")
            content = request.data
        payload = b64decode(content) if ("base64" in flags and isinstance(content, str)) else (
            content.encode() if isinstance(content, str) else content)
        digest = await asyncio.to_thread(write_atomically, target, payload)
        return reply(request, "sys", message=f"sha256:{digest}")

    async def do_pull(self, origin: "Origin", request: Request, binary: bytes | None) -> Response | None:
        flags, path = file_object(request.object)
        target = self._checked_path(path)
        if not target.is_file():
            raise UnitError(ErrorCode.FILE_PATH, message=FILE_MISSING)
        encoded = base64.b64encode(await asyncio.to_thread(target.read_bytes)).decode()
        if "stream" not in flags:
            return reply(request, "sys", data=encoded, object="sys.base64.stream")
        size = int(self.settings["sys.stream_chunk_chars"])
        index = 0
        for start in range(0, len(encoded), size):
            self.broker.answer(origin, reply(request, "sys", data=stream_data(index, encoded[start:start + size], False),
                                             object="sys.base64.stream"), final=False)
            index += 1
        return reply(request, "sys", data=stream_data(index, "", True), object="sys.base64.stream")

    async def do_update(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        root = Path(self.settings["sys.update_dir"])
        found = sorted(str(p) for p in root.glob("llm_update_*.deb"))
        return reply(request, "sys", data="".join(f"{p}\n" for p in found), object="sys.utf-8")

    async def do_upgrade(self, origin: "Origin", request: Request, binary: bytes | None) -> None:
        pattern = request.data
        if not isinstance(pattern, str) or not pattern or "/" in pattern or pattern.startswith("."):
            raise UnitError(ErrorCode.JSON_FORMAT, "upgrade data must be a file-name glob")
        root = Path(self.settings["sys.update_dir"])
        files = sorted(str(p) for p in root.glob(pattern) if p.is_file())
        if not files:
            raise UnitError(ErrorCode.FILE_PATH, message=FILE_MISSING)
        self.broker.answer(origin, reply(request, "sys", data="update ...", object="sys.utf-8"))
        code, output = await run_program(["dpkg", "-i", *files], timeout=600)
        if code != 0:
            log.error("upgrade failed: %s", output.decode("utf-8", "replace"))
        notice = Response("0", "sys", message="upgrade over")
        for identity, client in list(self.broker.clients.items()):
            if "uart" in client.features:
                self.broker.send_to_client(identity, bus.Control("notice", notice.to_dict()))
        return None

    async def do_rmmode(self, origin: "Origin", request: Request, binary: bytes | None) -> Response:
        name = request.data
        if not isinstance(name, str) or not PACKAGE_NAME.fullmatch(name):
            raise UnitError(ErrorCode.JSON_FORMAT, "rmmode data must be a model package name")
        manifest_dir = Path(self.settings["models.manifest_dir"])
        for candidate in (manifest_dir / f"mode_{name}.json", manifest_dir / f"{name}.json"):
            if candidate.is_file():
                candidate.unlink()
                return reply(request, "sys")
        code, output = await run_program([sys.executable, "-m", "pip", "uninstall", "-y", f"llm-{name}"], timeout=300)
        if code != 0 or b"WARNING: Skipping" in output:
            raise UnitError(ErrorCode.OPERATION_FAILED, output.decode("utf-8", "replace").strip()[-300:]
                            or f"llm-{name} is not installed")
        return reply(request, "sys")

    async def do_unit_call(self, origin: "Origin", request: Request, binary: bytes | None) -> None:
        unit_name, _, action = request.object.partition(".")
        record = self.broker.units.get(unit_name)
        if record is None:
            raise UnitError(ErrorCode.UNIT_CALL)
        if action not in record.actions:
            raise UnitError(ErrorCode.NO_UNIT_ACTION)
        inner = Request(request.request_id, unit_name, action, request.object, request.data)
        self.broker._forward(origin, inner, record, float(self.settings["timeouts.control_s"]), binary,
                             error_work_id="sys", rewrite={"work_id": "sys", "object": request.object})
        return None

    # helpers -----------------------------------------------------------------------------------
    def _collect(self, origin: "Origin", request: Request, ack: bool) -> str | None:
        """Reassemble a streamed sys input per (connection, action); None until the finish chunk (spec §7.6, §7.7, §10.1)."""
        finish = parse_chunk(request.data)[2]
        joined = self.streams.feed((origin.client, origin.conn), request.action, request.data)
        if ack:
            self.broker.answer(origin, reply(request, "sys"), final=not finish)
        elif not finish:
            self.broker.answer(origin, None, final=True)
        return joined

    def _checked_path(self, path: str) -> Path:
        if not path.startswith("/"):
            raise UnitError(ErrorCode.FILE_PATH, "the path must be absolute")
        target = Path(os.path.realpath(path))
        for root in self.settings["sys.file_roots"]:
            real_root = os.path.realpath(root)
            if os.path.commonpath([real_root, str(target)]) == real_root:
                return target
        raise UnitError(ErrorCode.FILE_PATH, "outside sys.file_roots")


def file_object(obj: str) -> tuple[set[str], str]:
    head, sep, path = obj.partition(".file.")
    if not sep or not path:
        raise UnitError(ErrorCode.FILE_PATH, "object must be sys[.base64][.stream].file.<absolute path>")
    return set(head.split(".")[1:]), path


def b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UnitError(ErrorCode.BASE64_DECODING) from None


def write_atomically(target: Path, payload: bytes) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return hashlib.sha256(payload).hexdigest()


def split_utf8(data: bytes, limit: int) -> list[str]:
    """Split into chunks of at most `limit` bytes without cutting a UTF-8 character."""
    chunks, start = [], 0
    while start < len(data):
        end = min(start + limit, len(data))
        while end < len(data) and end > start and (data[end] & 0xC0) == 0x80:
            end -= 1
        if end == start:
            end = min(start + limit, len(data))
        chunks.append(data[start:end].decode("utf-8", "replace"))
        start = end
    return chunks


def validate_uart(data: dict[str, Any]) -> dict[str, Any]:
    """The UART keys `data` gives, checked and in their canonical form."""
    new: dict[str, Any] = {}
    if "baud" in data:
        baud = data["baud"]
        if isinstance(baud, float) and baud.is_integer():
            baud = int(baud)
        if not isinstance(baud, int) or isinstance(baud, bool) or baud not in BAUD_RATES:
            raise UnitError(ErrorCode.JSON_FORMAT, f"unsupported baud rate {data['baud']}")
        new["baud"] = baud
    if "data_bits" in data:
        if data["data_bits"] not in (5, 6, 7, 8) or isinstance(data["data_bits"], bool):
            raise UnitError(ErrorCode.JSON_FORMAT, f"unsupported data_bits {data['data_bits']}")
        new["data_bits"] = int(data["data_bits"])
    if "stop_bits" in data:
        if data["stop_bits"] not in (1, 2) or isinstance(data["stop_bits"], bool):
            raise UnitError(ErrorCode.JSON_FORMAT, f"unsupported stop_bits {data['stop_bits']}")
        new["stop_bits"] = int(data["stop_bits"])
    if "parity" in data:
        parity = data["parity"]
        key = parity.lower() if isinstance(parity, str) else parity
        if isinstance(parity, bool) or key not in PARITY:
            raise UnitError(ErrorCode.JSON_FORMAT, f"unsupported parity {parity!r}")
        new["parity"] = PARITY[key]
    return new


async def run_program(argv: list[str], timeout: float) -> tuple[int, bytes]:
    """Run a program with an argument vector (never a shell string built from client data)."""
    if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
        raise UnitError(ErrorCode.OPERATION_FAILED, f"{argv[0]} is not installed")
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise UnitError(ErrorCode.TIMEOUT, f"{argv[0]} did not finish within {timeout:g} s") from None
    return proc.returncode or 0, output


async def run_in_pty(argv: list[str], timeout: float) -> bytes:
    """Run with a pseudo-terminal (echo off) as stdin/stdout/stderr; output merged, killed at timeout."""
    import pty

    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=slave, stdout=slave, stderr=slave,
                                                    start_new_session=True)
    finally:
        os.close(slave)
    loop = asyncio.get_running_loop()
    output = bytearray()
    done = asyncio.Event()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:
            data = b""
        if data:
            output.extend(data)
        else:
            loop.remove_reader(master)
            done.set()

    loop.add_reader(master, readable)
    try:
        await asyncio.wait_for(asyncio.gather(proc.wait(), done.wait()), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        output.extend(f"\r\n[killed after {timeout:g} s]\r\n".encode())
    finally:
        loop.remove_reader(master)
        os.close(master)
    return bytes(output)


# machine facts ---------------------------------------------------------------------------------
def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


async def cpu_load_percent(window_s: float) -> int:
    total0, idle0 = _cpu_times()
    await asyncio.sleep(window_s)
    total1, idle1 = _cpu_times()
    busy = (total1 - total0) - (idle1 - idle0)
    return int(round(100 * busy / max(1, total1 - total0)))


def meminfo_kib() -> tuple[int, int]:
    info: dict[str, int] = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
    return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))


def memory_percent() -> int:
    total, available = meminfo_kib()
    return int(round(100 * (total - available) / max(1, total)))


def temperature() -> int:
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp")):
        try:
            return int(Path(zone).read_text().strip())
        except (OSError, ValueError):
            continue
    return 0


def eth_info() -> list[dict[str, str]]:
    out = []
    for _, name in socket.if_nameindex():
        if name == "lo":
            continue
        out.append({"ip": _ipv4(name), "name": name, "speed": _speed(name)})
    return out


def _ipv4(name: str) -> str:
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return ""
    return socket.inet_ntoa(packed[20:24])


def _speed(name: str) -> str:
    try:
        value = int(Path(f"/sys/class/net/{name}/speed").read_text().strip())
    except (OSError, ValueError):
        return ""
    return str(value) if value > 0 else ""
