"""One typed Settings: defaults < /etc/unitbus/unitbus.toml < environment < command line (spec §20).

The defaults are core's keys below (the bus, framing, tasks, sys) plus the typed settings sections each
installed unit and face declares (dataclasses named in its UnitInfo or FaceInfo, core/registry.py): core
composes them and names none. Each default fixes its key's type.

Keys are flat dotted names ("tcp.port"). The TOML file uses sections ([tcp] port = 10001). The
environment form of a key is UNITBUS_ plus the key upper-cased with dots as underscores
(UNITBUS_TCP_PORT); UNITBUS_OVERRIDES may hold a JSON object of keys, which is how `unitbus up` hands
its command-line settings to the processes it starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from core import rundir
from core.rundir import RunDirError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CONFIG_PATH = Path("/etc/unitbus/unitbus.toml")

DEFAULTS: dict[str, Any] = {
    "tasks.cancel_on_disconnect": True,  # a connection that closes cancels its tasks' inferences in flight
    "tasks.reclaim_orphans": True,  # a full unit's setup exits idle, unlinked tasks whose owner left
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
    "log.level": "INFO",
}


T = TypeVar("T")


class SettingsError(ValueError):
    pass


def section_defaults(section: str, schema: type[Any]) -> dict[str, Any]:
    """The flat defaults ("<section>.<field>") of a typed settings section: a dataclass whose fields all
    have defaults, which fix each key's type (coerce)."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise SettingsError(f"settings section {section}: {schema!r} is not a dataclass")
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            defaults[f"{section}.{f.name}"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f"{section}.{f.name}"] = f.default_factory()
        else:
            raise SettingsError(f"{section}.{f.name}: a setting needs a default")
    return defaults


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

    def section(self, section: str, schema: type[T]) -> T:
        """A unit's settings section as its own dataclass (the values already coerced to its types)."""
        return schema(**{f.name: self._values[f"{section}.{f.name}"] for f in dataclasses.fields(schema)})  # type: ignore[arg-type]

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
                import difflib  # here: only a misspelt key needs it, and every process loads settings

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


def start_process(prog: str, description: str, argv: list[str] | None = None,
                  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                  ) -> tuple[Settings, argparse.Namespace]:
    """The command line every unitbus process takes (`--config`, `--set KEY=VALUE`, and what
    `add_arguments` adds), its settings as load_for_process checks them, and its logging set up under
    the process's short name (`prog` without "unitbus-")."""
    from core import logs

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="path of unitbus.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    settings = load_for_process(prog, args.config, args.set)
    logs.configure(settings["log.level"], prog.removeprefix("unitbus-"))
    return settings, args


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings from `--set`; values parsed later by coerce()."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SettingsError(f"--set {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out
