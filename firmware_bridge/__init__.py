"""The StackFlow bridge: JSON over TCP port 10001 and the UART, a bus client of sys (protocol.md §13, §14)."""
from dataclasses import dataclass
from typing import Any

from core.registry import FaceInfo, Listener


@dataclass(frozen=True)
class TcpSettings:
    """[tcp] in unitbus.toml."""
    enabled: bool = True
    port: int = 10001
    bind: str = "127.0.0.1"
    max_connections: int = 16
    max_connections_per_address: int = 0  # share kept when all slots are taken; 0: half of max_connections
    idle_timeout_s: float = 300.0  # close a connection without a task that sent and got nothing; 0: never


@dataclass(frozen=True)
class UartSettings:
    """[uart] in unitbus.toml."""
    enabled: str = "auto"  # "auto" (when the device exists), true or false
    device: str = "/dev/ttyS1"
    baud: int = 115200
    data_bits: int = 8
    parity: str = "n"
    stop_bits: int = 1
    persist: bool = False  # keep what sys.uartsetup set across restarts (in state_file)
    state_file: str = "/var/lib/unitbus/uart.json"
    reset_wait_s: float = 1.0  # how long the recovery handshake waits for the host at start (§14.1)


def listening(settings: Any) -> list[Listener]:
    return [Listener("tcp", settings["tcp.bind"], int(settings["tcp.port"]))] if settings["tcp.enabled"] else []


FACE = FaceInfo("bridge", "firmware_bridge", settings={"tcp": TcpSettings, "uart": UartSettings},
                listens=listening)
