"""The run directory: the bus socket and the registration key, reachable by their owner only (spec §19).

The directory is 0700 and owned by the user running unitbus; one that another user owns (or a symlink)
is refused, since whoever controls it can put a socket of their own in the bus's place. The key is a
random secret in a 0600 file that every process reads at start and sends in its hello: a process that
cannot read it cannot register with sys.
"""
from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

KEY_FILE = "bus.key"


class RunDirError(Exception):
    """The run directory or its key cannot be trusted or created; the message says what to do."""


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def default_path(run_writable: bool | None = None) -> Path:
    """/run/unitbus when /run is writable (root, systemd), else $XDG_RUNTIME_DIR/unitbus, else /tmp/unitbus-<uid>."""
    if run_writable if run_writable is not None else os.access("/run", os.W_OK):
        return Path("/run/unitbus")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "unitbus"
    import tempfile  # here and in key(): with shutil and random, it is only needed on these paths

    return Path(tempfile.gettempdir()) / f"unitbus-{os.geteuid()}"  # predictable, so checked like the rest


def prepare(path: Path) -> Path:
    """Create the run directory 0700 (whatever the umask), or check an existing one and make it 0700."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RunDirError(f"run dir {path} is not a directory (a symlink or a file): remove it, or set bus.run_dir")
    me = os.geteuid()
    if info.st_uid != me:
        raise RunDirError(f"run dir {path} belongs to {_user(info.st_uid)}, not to {_user(me)} running unitbus: "
                          f"run unitbus as that user, or set bus.run_dir to a directory of your own")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def key(path: Path) -> str:
    """The registration key in `path`, created on first use (by whichever process starts first)."""
    file = path / KEY_FILE
    if not file.exists():
        import secrets  # here: it loads OpenSSL, which only the process creating the key needs
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=path, prefix=".bus.key.")  # mkstemp files are 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
            try:
                os.link(tmp, file)  # atomic and never over another process's key: the file is whole or absent
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    info = os.lstat(file)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise RunDirError(f"{file} is not a file of {_user(os.geteuid())}: remove it (a new key is made at start)")
    if stat.S_IMODE(info.st_mode) != 0o600:
        os.chmod(file, 0o600)
    text = file.read_text().strip()
    if not text:
        raise RunDirError(f"{file} is empty: remove it (a new key is made at start)")
    return text
