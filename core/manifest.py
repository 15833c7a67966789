"""Model manifests (spec §17): one schema, the search order, alias resolution, setup-over-manifest merge."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, cast

from core import registry
from core.errors import ErrorCode, UnitError
from core.paths import package_dir, resolve_pkg_url
from core.settings import Settings

log = logging.getLogger(__name__)

# A language named in a StackFlow voice name (melotts-zh-cn, melotts_ja-jp-ax650): aliases cover the English ones.
LANGUAGE_TAG = re.compile(r"(?<![a-z])([a-z]{2}[-_][a-z]{2})(?![a-z])")

SCHEMA: dict[str, tuple[type, bool]] = {
    "mode": (str, True),
    "type": (str, True),
    "capabilities": (list, True),
    "input_type": (list, True),
    "output_type": (list, True),
    "mode_param": (dict, True),
    "homepage": (str, False),
    "license": (str, False),
    "aliases": (list, False),
    "details": (dict, False),
    "mode_param_bak": (dict, False),
    "compile_flage": (str, False),
    "pulsar_version": (str, False),
}


class ManifestError(ValueError):
    pass


@dataclass
class Manifest:
    data: dict[str, Any]
    path: Path

    @property
    def mode(self) -> str:
        return cast(str, self.data["mode"])  # checked on load (SCHEMA)

    @property
    def type(self) -> str:
        return cast(str, self.data["type"])

    @property
    def aliases(self) -> list[str]:
        return list(self.data.get("aliases", []))

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.data["mode_param"])

    @property
    def input_type(self) -> list[str]:
        return list(self.data["input_type"])

    @property
    def output_type(self) -> list[str]:
        return list(self.data["output_type"])

    def file(self, ref: str, data_dir: str | Path) -> Path:
        """A file reference of mode_param: absolute, pkg://, or relative to <data>/<mode>/ (StackFlow's rule)."""
        if ref.startswith("pkg://"):
            return resolve_pkg_url(ref)
        path = Path(ref)
        return path if path.is_absolute() else Path(data_dir) / self.mode / path


def validate(data: Any, source: str = "manifest") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: a manifest is a JSON object")
    for key, (kind, required) in SCHEMA.items():
        if key not in data:
            if required:
                raise ManifestError(f"{source}: missing key {key}")
            continue
        if not isinstance(data[key], kind):
            raise ManifestError(f"{source}: {key} must be a {kind.__name__}")
    for key in ("capabilities", "input_type", "output_type", "aliases"):
        if not all(isinstance(v, str) for v in data.get(key, [])):
            raise ManifestError(f"{source}: {key} must be a list of strings")
    if not data["mode"]:
        raise ManifestError(f"{source}: mode must not be empty")
    if data["type"] not in registry.manifest_types():
        raise ManifestError(f"{source}: type {data['type']} is no installed unit's")
    return data


def load_file(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: {exc}") from None
    return Manifest(validate(data, str(path)), path)


def bundled_dir() -> Path:
    return package_dir("models")


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


class ManifestStore:
    """The manifests one process can see, with the search roots of spec §17.2."""

    def __init__(self, settings: Settings | Mapping[str, Any] | None = None, cwd: Path | None = None,
                 bundled: Path | None = None):
        settings = settings or {}
        self.cwd = Path(cwd or Path.cwd())
        self.data_dir = Path(settings.get("models.data_dir", "/opt/unitbus/data/"))
        self.manifest_dir = Path(settings.get("models.manifest_dir", "/opt/unitbus/data/models/"))
        self.etc_dir = Path(settings.get("models.etc_dir", "/etc/unitbus/models/"))
        self.share_dir = Path(settings.get("models.share_dir", "/usr/share/unitbus/models/"))
        self.bundled = Path(bundled) if bundled else bundled_dir()
        self.unit_dirs = registry.manifest_dirs()

    def _candidates(self, name: str) -> list[Path]:
        files = [f"{name}.json", f"mode_{name}.json"]
        roots = [self.cwd, self.data_dir / name, self.manifest_dir, self.etc_dir, self.share_dir, self.bundled,
                 *self.unit_dirs]
        return [root / f for root in roots for f in files]

    def find_exact(self, name: str) -> Manifest | None:
        if not name or "/" in name or name.startswith("."):
            return None
        for path in self._candidates(name):
            if path.is_file():
                try:
                    return load_file(path)
                except ManifestError as exc:
                    log.warning("skipping invalid manifest: %s", exc)
        return None

    def all(self) -> list[Manifest]:
        """lsmode's view: the manifest directory plus the bundled ones (a name there hides a bundled one)."""
        found: dict[str, Manifest] = {}
        for root in (*self.unit_dirs, self.bundled, self.manifest_dir):
            if not root.is_dir():
                continue
            for path in sorted(root.glob("*.json")):
                try:
                    manifest = load_file(path)
                except ManifestError as exc:
                    log.warning("skipping invalid manifest: %s", exc)
                    continue
                found[manifest.mode] = manifest
        return [found[k] for k in sorted(found, key=lambda m: found[m].path.name)]

    def resolve(self, name: str, unit_name: str) -> tuple[Manifest, str]:
        """The manifest for `setup.model`, and a note when an alias was used (spec §17.3, §17.5)."""
        info = registry.unit_serving(unit_name)
        wanted_type = info.types[0] if info is not None else unit_name
        exact = self.find_exact(name)
        if exact is not None and exact.type == wanted_type:
            return exact, ""
        candidates = [m for m in self.all() if m.type == wanted_type]
        for match in (lambda a, b: a == b, lambda a, b: _normal(a) == _normal(b)):
            for manifest in candidates:
                if match(manifest.mode, name):
                    return manifest, ""
            for manifest in candidates:
                if any(match(alias, name) for alias in manifest.aliases):
                    return manifest, f"model alias: {name} -> {manifest.mode}"
        installed = ", ".join(sorted(m.mode for m in candidates)) or "none"
        language = LANGUAGE_TAG.search(name.lower())
        if wanted_type == "tts" and language:
            raise UnitError(ErrorCode.MODEL_LOADING,
                            f"no voice for {language.group(1).replace('_', '-')} is installed (installed: {installed})")
        raise UnitError(ErrorCode.MODEL_LOADING,
                        f"no manifest named {name} (installed {wanted_type} models: {installed}; see sys.lsmode)")


def merge_params(defaults: Mapping[str, Any], mode_param: Mapping[str, Any], setup: Mapping[str, Any],
                 required: tuple[str, ...] = ()) -> dict[str, Any]:
    """setup > manifest > unit default for every key (spec §17.4), type-checked against the default.

    Keys only the manifest knows are kept as they are (engine parameters such as file references).
    """
    merged: dict[str, Any] = dict(mode_param)
    for key, default in defaults.items():
        merged.setdefault(key, default)
    for key, value in setup.items():
        if key in defaults or key in mode_param:
            merged[key] = value
        else:
            log.info("setup key %s is neither a unit nor a manifest parameter; ignored", key)
    for key, value in list(merged.items()):
        reference = defaults.get(key, mode_param.get(key))
        if reference is not None and value is not None:
            merged[key] = coerce_param(key, value, reference)
    for key in required:
        if merged.get(key) is None:
            raise UnitError(ErrorCode.MODEL_LOADING, f"required key {key} missing")
    return merged


_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}


def coerce_param(key: str, value: Any, reference: Any) -> Any:
    """Spec §8.1: numbers are coerced when lossless, booleans never come from numbers."""
    kind = type(reference)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [value]
    elif isinstance(value, kind):
        return value
    elif reference is None:
        return value
    raise UnitError(ErrorCode.JSON_FORMAT, f"{key}: expected {_TYPE_NAMES.get(kind, kind.__name__)}")
