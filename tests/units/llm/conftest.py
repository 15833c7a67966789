"""Fixtures for the llm engine tests: the SmolLM2 GGUF from its registry package, converted once into
the unitbus cache (later sessions reuse the conversion) and loaded once per session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

MANIFEST = Path(__file__).resolve().parents[3] / "models" / "mode_smollm2-135m-instruct.json"


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="session")
def gguf_path(manifest) -> Path:
    from core.paths import resolve_pkg_url

    return resolve_pkg_url(manifest["mode_param"]["gguf"])


@pytest.fixture(scope="session")
def model_dir(manifest) -> Path:
    from models.gguf_llama import convert_manifest

    return convert_manifest(manifest, progress=False)


@pytest.fixture(scope="session")
def engine(model_dir, manifest):
    from units.llm.engine import load_llm

    return load_llm({**manifest["mode_param"], "threads": 2})


@pytest.fixture(scope="session")
def gguf_reader(gguf_path):
    from gguf import GGUFReader

    return GGUFReader(str(gguf_path))
