"""Installed units, as they describe themselves: core names no unit.

A unit package announces itself with an entry point in the group `unitbus.units` whose object is a
`UnitInfo`: the process to run, the work_id names it answers, the manifest types it loads, its settings
section (a dataclass: the keys of `[<name>]`, their defaults and types) and, if its models need one, a converter. unitbus's own
units are registered the same way in setup.cfg as any unit installed from elsewhere.

The descriptor is read without starting the unit, so it lives in the unit package's `__init__.py` and
imports nothing heavy.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from core.settings import SettingsError, section_defaults

log = logging.getLogger(__name__)

GROUP = "unitbus.units"


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


@functools.lru_cache(maxsize=1)
def installed() -> dict[str, UnitInfo]:
    """Every installed unit by name (read once per process: entry points do not change while it runs)."""
    units: dict[str, UnitInfo] = {}
    for entry in metadata.entry_points(group=GROUP):
        try:
            info = entry.load()
        except Exception as exc:  # noqa: BLE001 - one broken package must not take every unit down
            log.error("unit entry point %s (%s) does not load: %s", entry.name, entry.value, exc)
            continue
        if not isinstance(info, UnitInfo) or info.name != entry.name:
            log.error("unit entry point %s (%s) is not a UnitInfo named %s", entry.name, entry.value, entry.name)
            continue
        try:
            section(info)
        except SettingsError as exc:
            log.error("unit entry point %s (%s): %s", entry.name, entry.value, exc)
            continue
        units.setdefault(info.name, info)
    return units


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
    return defaults


def settings_defaults() -> dict[str, Any]:
    """The settings sections of every installed unit."""
    defaults: dict[str, Any] = {}
    for info in installed().values():
        defaults.update(section(info))
    return defaults
