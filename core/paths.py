"""Where unitbus finds package files and keeps converted models."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it.

    Model packages are installed with --no-deps, so importing them fails; their files are still there.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"python package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_pkg_url(url: str) -> Path:
    """`pkg://<package>/<path>` -> the file inside the installed package."""
    if not url.startswith("pkg://"):
        raise ValueError(f"not a pkg:// reference: {url}")
    package, _, inner = url[len("pkg://"):].partition("/")
    path = package_dir(package) / inner
    if not path.exists():
        raise FileNotFoundError(f"{url}: {path} does not exist")
    return path


def cache_dir() -> Path:
    """Converted models live here: UNITBUS_CACHE_DIR, else $XDG_CACHE_HOME/unitbus, else ~/.cache/unitbus."""
    explicit = os.environ.get("UNITBUS_CACHE_DIR")
    if explicit:
        root = Path(explicit)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unitbus"
    root.mkdir(parents=True, exist_ok=True)
    return root
