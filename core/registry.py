"""Installed units and faces, as they describe themselves: core names neither.

A unit package announces itself with an entry point in the group `unitbus.units` whose object is a
`UnitInfo`: the process to run, the work_id names it answers, the manifest types it loads, its settings
section (a dataclass: the keys of `[<name>]`, their defaults and types) and, if its models need one, a
converter. A face (a bus client speaking a protocol to the outside: the StackFlow bridge, the HTTP
gateways, Wyoming, the fleet) announces itself in `unitbus.faces` with a `FaceInfo`: its processes, its
settings sections and the ports `unitbus up` waits for. unitbus's own are registered the same way in
setup.cfg as any installed from elsewhere.

A descriptor is read without starting its process, so it lives in the package's `__init__.py` and
imports nothing heavy. For the same reason the entry points are read from each distribution's
entry_points.txt here rather than with importlib.metadata, which brings email, zipfile and csv into
every process (1.6 MB each, nine processes in the voice stack); tests/core/test_entry_points.py keeps
the two in agreement.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from core.settings import DEFAULTS, SettingsError, section_defaults

log = logging.getLogger(__name__)

GROUP = "unitbus.units"
FACE_GROUP = "unitbus.faces"


@dataclass(frozen=True)
class UnitInfo:
    name: str  # the unit's process and work_id prefix: "asr"
    module: str  # run as `python -m <module>`
    serves: tuple[str, ...] = ()  # other work_id names it answers: ("whisper",)
    manifest_types: tuple[str, ...] = ()  # manifest "type" values its setups load; default: (name,)
    settings: type[Any] | None = None  # a dataclass: the settings section [<name>] (core/settings.py)
    max_tasks: int = 1  # default of "<name>.max_tasks" (spec §5.3)
    converter: str = ""  # "module:function(manifest_dict, force=...) -> path", for `unitbus models convert`
    manifests: str = ""  # "pkg://<package>/<folder>" of the unit's own mode_*.json files (spec §17.2)
    start_by_default: bool = True  # started by `unitbus up` when up.units is empty (a template says False)

    @property
    def types(self) -> tuple[str, ...]:
        return self.manifest_types or (self.name,)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.serves)


@dataclass(frozen=True)
class Process:
    name: str  # the child's name in `unitbus up`, `unitbus run <name>` and systemd's unitbus-<name>.service
    module: str  # run as `python -m <module>`


@dataclass(frozen=True)
class Listener:
    label: str  # "tcp", "openai": how the ready line names it
    host: str
    port: int


@dataclass(frozen=True)
class FaceInfo:
    name: str  # its process name; the setting up.<name> lets `unitbus up` start it
    module: str  # run as `python -m <module>`
    settings: Mapping[str, type[Any]] = field(default_factory=dict)  # its sections: {"tcp": TcpSettings}
    requires: tuple[str, ...] = ()  # modules it needs (an optional extra): without one it is not started
    start_by_default: bool = True  # the default of up.<name>
    # What `unitbus up` starts for it (when up.<name> is true): default, its own process. The fleet
    # starts nothing until it is given a NATS server, and then perhaps a nats-server of its own too.
    processes: Callable[[Any], list[Process]] | None = None
    helpers: tuple[Process, ...] = ()  # processes other than its own that `processes` may return
    listens: Callable[[Any], list[Listener]] | None = None  # ports `unitbus up` waits for before it is ready

    def planned(self, settings: Any) -> list[Process]:
        if not settings[f"up.{self.name}"]:
            return []
        return self.processes(settings) if self.processes is not None else [Process(self.name, self.module)]

    def listening(self, settings: Any) -> list[Listener]:
        return self.listens(settings) if self.listens is not None else []

    def available(self) -> bool:
        return all(module_exists(module) for module in self.requires)


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def entry_points(group: str) -> list[tuple[str, str]]:
    """(name, "module:object") of every entry point in `group`, from the distributions on sys.path.

    Each distribution's entry_points.txt is read as importlib.metadata reads it (the first distribution of
    a name on sys.path wins), without importing importlib.metadata: every process reads the entry points
    for its settings, and that module brings email, zipfile and csv with it (1.6 MB in each process).
    """
    seen: set[str] = set()
    found: list[tuple[str, str]] = []
    for folder in sys.path:
        try:
            names = sorted(os.listdir(folder or "."))
        except OSError:  # absent, or a zip file
            continue
        for name in names:
            stem, _, kind = name.rpartition(".")
            distribution = re.sub(r"[-_.]+", "_", stem.split("-")[0]).lower()
            if kind not in ("dist-info", "egg-info") or distribution in seen:
                continue
            seen.add(distribution)
            try:
                text = Path(folder or ".", name, "entry_points.txt").read_text(encoding="utf-8")
            except OSError:
                continue
            section = ""
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("["):
                    section = line.strip("[]").strip()
                elif section == group and "=" in line and not line.startswith(("#", ";")):
                    key, _, value = line.partition("=")
                    found.append((key.strip(), value.split("[")[0].strip()))  # extras ("[cuda]") need nothing
    return found


def load_entry_point(value: str) -> Any:
    """The object an entry point's value names: "package.module:object.attribute"."""
    module, _, attribute = value.partition(":")
    obj: Any = importlib.import_module(module.strip())
    for part in filter(None, attribute.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def _entries(group: str, kind: type[Any], check: Callable[[Any], object]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, value in entry_points(group):
        try:
            info = load_entry_point(value)
        except Exception as exc:  # noqa: BLE001 - one broken package must not take the others down
            log.error("%s entry point %s (%s) does not load: %s", group, name, value, exc)
            continue
        if not isinstance(info, kind) or info.name != name:
            log.error("%s entry point %s (%s) is not a %s named %s", group, name, value, kind.__name__, name)
            continue
        try:
            check(info)
        except SettingsError as exc:
            log.error("%s entry point %s (%s): %s", group, name, value, exc)
            continue
        found.setdefault(info.name, info)
    return found


@functools.lru_cache(maxsize=1)
def installed() -> dict[str, UnitInfo]:
    """Every installed unit by name (read once per process: entry points do not change while it runs)."""
    return _entries(GROUP, UnitInfo, section)


@functools.lru_cache(maxsize=1)
def faces() -> dict[str, FaceInfo]:
    """Every installed face by name, in name order (the order `unitbus up` starts them in)."""
    found = _entries(FACE_GROUP, FaceInfo, face_sections)
    return {name: found[name] for name in sorted(found)}


def unit_serving(name: str) -> UnitInfo | None:
    """The installed unit that answers work_id name `name` (its own name or one it serves)."""
    for info in installed().values():
        if name in info.names:
            return info
    return None


def default_units() -> list[str]:
    return [name for name, info in installed().items() if info.start_by_default]


def manifest_dirs() -> list[Path]:
    """The manifest folders installed units ship (searched after unitbus's own, spec §17.2)."""
    from core.paths import resolve_pkg_url

    folders = []
    for info in installed().values():
        if info.manifests:
            try:
                folders.append(resolve_pkg_url(info.manifests))
            except (LookupError, ValueError, OSError) as exc:
                log.error("unit %s: manifest folder %s: %s", info.name, info.manifests, exc)
    return folders


def manifest_types() -> set[str]:
    return {t for info in installed().values() for t in info.types}


def section(info: UnitInfo) -> dict[str, Any]:
    """A unit's settings section as flat defaults, its task limit included."""
    defaults = {f"{info.name}.max_tasks": info.max_tasks}
    if info.settings is not None:
        defaults.update(section_defaults(info.name, info.settings))
    return _not_core(defaults)


def face_sections(info: FaceInfo) -> dict[str, Any]:
    """A face's settings sections as flat defaults, with up.<name>."""
    defaults: dict[str, Any] = {f"up.{info.name}": info.start_by_default}
    for name, schema in info.settings.items():
        defaults.update(section_defaults(name, schema))
    return _not_core(defaults)


def _not_core(defaults: dict[str, Any]) -> dict[str, Any]:
    taken = sorted(set(defaults) & set(DEFAULTS))
    if taken:
        raise SettingsError(f"{', '.join(taken)}: core's own setting (a package cannot redefine it)")
    return defaults


def settings_defaults() -> dict[str, Any]:
    """The settings sections of every installed unit and face."""
    defaults: dict[str, Any] = {}
    for info in installed().values():
        defaults.update(section(info))
    for face in faces().values():
        defaults.update(face_sections(face))
    return defaults
