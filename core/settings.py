"""One typed Settings: defaults < /etc/unitbus/unitbus.toml < environment < command line (spec §20).

The defaults are core's keys below plus the settings sections the installed units declare (core/registry.py);
each default fixes its key's type.

Keys are flat dotted names ("tcp.port"). The TOML file uses sections ([tcp] port = 10001). The
environment form of a key is UNITBUS_ plus the key upper-cased with dots as underscores
(UNITBUS_TCP_PORT); UNITBUS_OVERRIDES may hold a JSON object of keys, which is how `unitbus up` hands
its command-line settings to the processes it starts.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from core import rundir
from core.rundir import RunDirError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CONFIG_PATH = Path("/etc/unitbus/unitbus.toml")

DEFAULTS: dict[str, Any] = {
    "tcp.enabled": True,
    "tcp.port": 10001,
    "tcp.bind": "127.0.0.1",
    "tcp.max_connections": 16,
    "tcp.max_connections_per_address": 0,  # share kept when all slots are taken; 0: half of tcp.max_connections
    "tcp.idle_timeout_s": 300.0,  # close a connection without a task that sent and got nothing; 0: never
    "tcp.cancel_on_disconnect": True,
    "tasks.reclaim_orphans": True,  # a full unit's setup exits idle, unlinked tasks whose owner left
    "uart.enabled": "auto",
    "uart.device": "/dev/ttyS1",
    "uart.baud": 115200,
    "uart.data_bits": 8,
    "uart.parity": "n",
    "uart.stop_bits": 1,
    "uart.persist": False,
    "uart.state_file": "/var/lib/unitbus/uart.json",
    "uart.reset_wait_s": 1.0,
    "framing.max_frame_bytes": 4 * MIB,
    "framing.max_raw_bytes": 4 * MIB,
    "framing.max_stream_bytes": 16 * MIB,
    "framing.idle_reset_s": 5.0,
    "framing.max_pending_bytes": 1 * MIB,
    "framing.escape_braces": "uart",  # "uart", true (every connection) or false (spec §4.3)
    "work_id.start": 1000,
    "sys.allow": [],
    "sys.token": "",
    "sys.file_roots": [],
    "sys.shell_timeout_s": 60.0,
    "sys.api_version": "v1.6",
    "sys.update_dir": "/mnt",
    "sys.stream_chunk_chars": 1024,
    "timeouts.control_s": 10.0,
    "timeouts.setup_s": 120.0,
    "timeouts.stream_idle_s": 60.0,
    "bus.endpoint": "",
    "bus.run_dir": "",
    "bus.heartbeat_s": 1.0,
    "bus.liveness_s": 5.0,
    "models.data_dir": "/opt/unitbus/data/",
    "models.manifest_dir": "/opt/unitbus/data/models/",
    "models.etc_dir": "/etc/unitbus/models/",
    "models.share_dir": "/usr/share/unitbus/models/",
    "up.units": [],  # empty: every installed unit that starts by default (core/registry.py)
    "up.bridge": True,
    "up.http": True,
    "up.wyoming": True,
    "log.level": "INFO",
    # HTTP gateways (http-apis.md): one process, one listener per API.
    "http.bind": "127.0.0.1",
    "http.console": "openai",  # the web console: "openai" (at / of the OpenAI port), a port number, or "off"
    "http.openai.enabled": True,
    "http.openai.port": 8000,
    "http.ollama.enabled": True,
    "http.ollama.port": 11434,
    "http.ai00.enabled": True,
    "http.ai00.port": 65530,
    "http.cortex.enabled": True,
    "http.cortex.port": 1337,
    "http.public_url": "",
    "http.max_queue": 8,
    "http.queue_timeout_s": 300.0,
    "http.keep_alive": "5m",
    "http.preload": [],
    "http.abort_load_on_disconnect": False,
    "http.sse_keepalive_s": 15.0,
    "http.api_key": "",
    "http.allow_model_management": False,
    "http.max_body_bytes": 16 * MIB,
    "http.max_inflight_per_key": 0,
    "http.max_inflight_per_ip": 0,
    "http.header_timeout_s": 10.0,  # a connection whose request headers take longer is closed
    "http.body_timeout_s": 60.0,  # a request body not all received this long after its headers: 408
    "http.truncate_history": "",
    "http.openai.project": "unitbus",
    "http.openai.dbc_fields": True,
    "http.openai.dbc_strict_status": False,
    "http.ollama.reported_version": "0.12.6",
    "http.ai00.model": "",
    "http.ai00.prompt": "ai00",
    "http.ai00.secret": "",
    "http.ai00.app_keys": [],
    "http.ai00.expire_sec": 86400,
    "http.ai00.force_pass": False,
    "http.ai00.embed_model": "",
    "http.ai00.max_state_streams": 4,  # /api/models/state streams open at once
    "http.dbc.enabled": False,
    "http.dbc.node": "http://127.0.0.1:6000",
    "http.dbc.project": "unitbus",
    "http.dbc.cid": "",
    "http.dbc.models": [],
    "http.dbc.refresh_s": 60.0,
    # Wyoming server (Home Assistant voice services): asr, tts, wake and handle from the units.
    "wyoming.bind": "127.0.0.1",
    "wyoming.port": 10300,
    "wyoming.zeroconf": "auto",  # advertise _wyoming._tcp: "auto" (only when bound off loopback), true, false
    "wyoming.zeroconf_name": "",  # the advertised service name; empty: unitbus-<hostname>
    "wyoming.keep_alive": "30m",  # idle time before the server's tasks are unloaded; negative: never
    "wyoming.preload": [],  # models loaded at start and kept
    "wyoming.handle_model": "",  # the llm answering `transcript` (empty: the first installed llm)
    "wyoming.handle_prompt": "You are a voice assistant. Answer in one or two short sentences.",
    "wyoming.handle_max_tokens": 160,
    # The fleet: boards joined over NATS (protocol.md §21); off while url is empty and serve false.
    "fleet.url": "",  # nats://host:port of a NATS server (comma-separated for a cluster)
    "fleet.serve": False,  # also run a nats-server on this board (on fleet.listen)
    "fleet.listen": "127.0.0.1:4222",
    "fleet.hub": "",  # nats-leaf://host:7422 of a hub (comma-separated): the served nats-server is its leaf node
    "fleet.leaf_listen": "",  # host:port where the served nats-server accepts leaf nodes (it is a hub)
    "fleet.leaf_user": "unitbus",  # leaf node credentials, both ends (or the nkey of fleet.nkey_seed)
    "fleet.leaf_password": "",
    "fleet.board": "",  # this board's name in work_ids (llm@kitchen); empty: the host name
    "fleet.token": "",  # NATS token; a served nats-server requires it
    "fleet.nkey_seed": "",  # file of an nkey seed (SU...); a served nats-server accepts its public key
    "fleet.tls_cert": "",
    "fleet.tls_key": "",
    "fleet.tls_ca": "",
    "fleet.alive_s": 0.5,  # each board announces itself this often
    "fleet.liveness_s": 2.0,  # a board silent this long is gone: its requests in flight are answered
    "fleet.discover_s": 0.3,  # how long a fleet-wide listing waits for boards to answer $SRV.PING
    "fleet.balance": False,  # the HTTP gateways send llm inferences to any board serving the model (llm@*)
    "fleet.slots": 1,  # load-balanced inferences this board runs at once; more are answered "busy"
    "fleet.balance_wait_s": 120.0,  # how long a load-balanced inference waits for a board that is not busy
}


class SettingsError(ValueError):
    pass


def coerce(key: str, value: Any, default: Any) -> Any:
    """Convert `value` to the type of `default`; strings from the environment or CLI are parsed."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise SettingsError(f"{key}: expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise SettingsError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise SettingsError(f"{key}: expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise SettingsError(f"{key}: expected a number, got {value!r}")
    if isinstance(default, list):
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = [v.strip() for v in value.split(",") if v.strip()]
            value = parsed
        if isinstance(value, list):
            return value
        raise SettingsError(f"{key}: expected a list, got {value!r}")
    if isinstance(value, (bool, int, float)) and isinstance(default, str):
        return str(value)
    if isinstance(value, str):
        return value
    raise SettingsError(f"{key}: expected text, got {value!r}")


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def known_defaults() -> dict[str, Any]:
    """Core's defaults and those of every installed unit."""
    from core.registry import settings_defaults

    return {**DEFAULTS, **settings_defaults()}


def env_name(key: str) -> str:
    return "UNITBUS_" + key.upper().replace(".", "_")


class Settings:
    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @classmethod
    def load(cls, config: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[str] = (),
             environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values = known_defaults()
        path = Path(config or environ.get("UNITBUS_CONFIG") or CONFIG_PATH)
        if path.exists():
            with open(path, "rb") as fh:
                try:
                    table = tomllib.load(fh)
                except tomllib.TOMLDecodeError as exc:
                    raise SettingsError(f"{path}: {exc}") from None
            cls._apply(values, _flatten(table), str(path))
        env_values = {key: environ[env_name(key)] for key in values if env_name(key) in environ}
        if environ.get("UNITBUS_OVERRIDES"):
            try:
                env_values.update(json.loads(environ["UNITBUS_OVERRIDES"]))
            except ValueError as exc:
                raise SettingsError(f"UNITBUS_OVERRIDES: {exc}") from None
        cls._apply(values, env_values, "environment")
        if not isinstance(overrides, Mapping):
            overrides = parse_assignments(overrides)
        cls._apply(values, overrides, "command line")
        return cls(values)

    @staticmethod
    def _apply(values: dict[str, Any], new: Mapping[str, Any], source: str) -> None:
        defaults = known_defaults()
        for key, value in new.items():
            if key in defaults:
                values[key] = coerce(key, value, defaults[key])
            else:
                # A misspelt key would otherwise leave the setting at its default without a word.
                close = difflib.get_close_matches(key, defaults, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise SettingsError(f"{source}: unknown setting {key}{hint}")

    def run_dir(self) -> Path:
        """The bus's run directory, created or checked owner-only (core/rundir.py)."""
        try:
            return rundir.prepare(Path(self["bus.run_dir"]) if self["bus.run_dir"] else rundir.default_path())
        except (RunDirError, OSError) as exc:
            raise SettingsError(f"bus.run_dir: {exc}") from None

    def bus_key(self) -> str:
        """The registration key every process sends in its hello (core/rundir.py)."""
        try:
            return rundir.key(self.run_dir())
        except (RunDirError, OSError) as exc:
            raise SettingsError(f"bus key: {exc}") from None

    def bus_endpoint(self) -> str:
        return self["bus.endpoint"] or f"ipc://{self.run_dir() / 'sys.sock'}"


def load_for_process(prog: str, config: str | None, overrides: Iterable[str]) -> Settings:
    """A process's settings, its run dir and key checked: a bad setting or an untrusted run dir ends the
    process with one line saying what is wrong (exit status 2), not a traceback."""
    try:
        settings = Settings.load(config, overrides)
        settings.bus_key()
    except SettingsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings from `--set`; values parsed later by coerce()."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SettingsError(f"--set {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out
