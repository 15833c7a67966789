"""Build once, reuse after: the one cache every converted model lives in (core.paths.cache_dir()).

A build is a folder. It is made in a temporary folder beside its target and renamed into place, so a crash
never leaves half a model and a reader never sees one; it is reused while its stamp (`build.json`: the
sources' names, sizes and contents, the converter's version and its options) is unchanged, and rebuilt
otherwise. A source is known by what it holds, not where it lies or when it was written: the same model
package installed in another virtualenv (another checkout, or `pip install` run again) reuses the build
instead of converting for minutes.
When two processes build at once, the first rename wins and the other uses that build.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

STAMP = "build.json"
# A source's digest covers its first and last MiB and its size: model files differ there when they differ
# at all (headers, tensor tables), and it costs a few milliseconds where hashing a 100 MB model costs ~0.1 s
# on every setup.
_DIGEST_SPAN = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of the file's size, first MiB and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_DIGEST_SPAN))
        if size > _DIGEST_SPAN:
            f.seek(max(_DIGEST_SPAN, size - _DIGEST_SPAN))
            digest.update(f.read())
    return digest.hexdigest()


def source_stamp(sources: Iterable[Path], version: int, **options: Any) -> dict[str, Any]:
    """What a build depends on: each source file's name, size and digest, the builder's version, options."""
    files = {}
    for path in map(Path, sources):
        if path.name in files:  # keyed by name: two sources of one name would stand for one
            raise ValueError(f"two sources named {path.name} in one build")
        files[path.name] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return {"version": version, "sources": files, **options}


def is_current(target: Path, stamp: dict[str, Any], required: Iterable[str]) -> bool:
    try:
        recorded = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return recorded == stamp and all((target / name).exists() for name in required)


def build_once(target: Path, stamp: dict[str, Any], build: Callable[[Path], None], required: Iterable[str],
               force: bool = False) -> Path:
    """The folder `target`, filled by `build(empty folder)` unless a build with this stamp is already there."""
    required = tuple(required)
    if not force and is_current(target, stamp, required):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        built = work / "build"
        built.mkdir()
        build(built)
        missing = [name for name in required if not (built / name).exists()]
        if missing:
            raise RuntimeError(f"building {target.name} left out {missing}")
        (built / STAMP).write_text(json.dumps(stamp, indent=1))
        built.chmod(0o755)  # mkdtemp's folder is private; the cache serves every user of the machine
        if target.exists():
            if not force and is_current(target, stamp, required):
                return target  # another process finished first
            os.rename(target, work / "stale")
        try:
            os.rename(built, target)
        except OSError:
            if not is_current(target, stamp, required):  # lost a race to a build of other sources
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("built %s", target)
    return target
