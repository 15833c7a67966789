"""The import rules of the design card, checked on the source tree."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def py_files(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def test_core_imports_no_unit_and_no_bridge():
    for path in py_files("core"):
        bad = {n for n in imports_of(path) if n.split(".")[0] in ("units", "firmware_bridge")}
        assert not bad, f"{path}: {bad}"


def test_only_core_bus_imports_zmq():
    for folder in ("core", "units", "firmware_bridge", "models"):
        for path in py_files(folder):
            if path == ROOT / "core" / "bus.py":
                continue
            assert not {n for n in imports_of(path) if n.split(".")[0] == "zmq"}, path


def test_units_import_core_and_themselves_only():
    for path in py_files("units"):
        unit = path.relative_to(ROOT / "units").parts[0]
        if unit == "__init__.py":
            continue
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "units":
                assert len(parts) > 1 and parts[1] == unit, f"{path} imports {name}"
            assert parts[0] != "firmware_bridge", path


def test_engines_import_no_zmq_and_no_asyncio():
    for path in sorted((ROOT / "units").rglob("engine.py")):
        names = {n.split(".")[0] for n in imports_of(path)}
        assert not names & {"zmq", "asyncio"}, path
        assert not {n for n in imports_of(path) if n in ("core.bus", "core.unit", "core.client")}, path


def test_models_import_core_and_themselves_only():
    # Converters run at install time and from the units: they may use core, never a unit or a bridge.
    for path in py_files("models"):
        bad = {n for n in imports_of(path) if n.split(".")[0] in ("units", "firmware_bridge")}
        assert not bad, f"{path}: {bad}"


def test_every_module_is_checked():
    # A new top-level package would escape the rules above: name it here with its rule.
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert tops == {"core", "units", "firmware_bridge", "models"}, tops


def test_bridge_never_imports_units():
    for path in py_files("firmware_bridge"):
        assert not {n for n in imports_of(path) if n.split(".")[0] == "units"}, path


def test_no_hand_built_envelopes_outside_the_codec():
    for folder in ("core", "units", "firmware_bridge"):
        for path in py_files(folder):
            if path.name == "envelope.py":
                continue
            text = path.read_text()
            assert '"request_id":' not in text and "'request_id':" not in text, path


def test_task_pool_knows_no_face():
    names = imports_of(ROOT / "firmware_bridge" / "pool.py")
    assert not {n for n in names if n.startswith("firmware_bridge.") or n.split(".")[0] in
                ("fastapi", "starlette", "uvicorn", "wyoming")}, names
