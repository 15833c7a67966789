"""The run dir and the bus key: owner-only whatever the umask, another user's directory refused (spec §19)."""
from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading

import pytest

from core import bus, rundir
from core.settings import Settings, SettingsError
from support import REPO


@pytest.fixture
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_run_dir_and_key_are_owner_only_under_umask_0(tmp_path, open_umask):
    run = tmp_path / "a" / "run"
    settings = Settings.load(None, {"bus.run_dir": str(run)})
    assert settings.run_dir() == run and mode(run) == 0o700
    key = settings.bus_key()
    assert len(key) == 64 and mode(run / rundir.KEY_FILE) == 0o600
    assert settings.bus_key() == key  # read again, not made again
    assert [p.name for p in run.iterdir()] == [rundir.KEY_FILE]  # no temporary file left


def test_an_existing_run_dir_of_ours_is_made_0700(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o777)
    os.chmod(run, 0o777)
    rundir.prepare(run)
    assert mode(run) == 0o700


def test_another_users_run_dir_or_key_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    with pytest.raises(rundir.RunDirError, match=r"belongs to .*uid 65534.*not to .*uid 0"):
        rundir.prepare(run)
    mine = tmp_path / "mine"
    rundir.prepare(mine)
    (mine / rundir.KEY_FILE).write_text("x" * 64)
    os.chown(mine / rundir.KEY_FILE, 65534, 65534)
    with pytest.raises(rundir.RunDirError, match="bus.key is not a file of"):
        rundir.key(mine)


def test_a_symlinked_run_dir_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "run").symlink_to(target)
    with pytest.raises(SettingsError, match="not a directory"):
        Settings.load(None, {"bus.run_dir": str(tmp_path / "run")}).run_dir()


def test_without_run_or_xdg_the_tmp_dir_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    path = rundir.default_path(run_writable=False)
    assert path == tmp_path / f"unitbus-{os.geteuid()}"
    path.symlink_to(tmp_path)  # planted before unitbus starts
    with pytest.raises(rundir.RunDirError, match="not a directory"):
        rundir.prepare(path)


def test_processes_starting_together_share_one_key(tmp_path):
    run = rundir.prepare(tmp_path / "run")
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(rundir.key(run))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys) == 8


def test_the_bus_socket_is_0600_under_umask_0(tmp_path, open_umask):
    run = rundir.prepare(tmp_path / "run")

    async def bind() -> int:
        ctx = bus.Context()
        router = ctx.router(f"ipc://{run / 'sys.sock'}")
        try:
            return mode(run / "sys.sock")
        finally:
            router.close()
            ctx.term()

    assert asyncio.run(bind()) == 0o600


def test_a_process_refuses_to_start_in_another_users_run_dir(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    result = subprocess.run([sys.executable, "-m", "core.sys", "--set", f"bus.run_dir={run}"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("unitbus-sys: bus.run_dir: run dir") and "belongs to" in result.stderr
    assert "Traceback" not in result.stderr
