"""TLS between boards (protocol.md §21.7): a served nats-server that verifies client certificates."""
from __future__ import annotations

import subprocess
import time

import pytest

from fleet_support import board, wait_joined
from support import StackFlowClient, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def make_certificates(folder) -> dict[str, str]:
    """A CA and one certificate it signs for 127.0.0.1, usable by the server and by clients."""
    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=folder)

    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=unitbus test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "board.key", "-out", "board.csr", "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", "board.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "board.pem", "-days", "1", "-extfile", "ext.cnf")
    return {"fleet.tls_ca": str(folder / "ca.pem"), "fleet.tls_cert": str(folder / "board.pem"),
            "fleet.tls_key": str(folder / "board.key")}


def test_boards_over_tls_and_one_without_a_certificate(tmp_path):
    certs = make_certificates(tmp_path)
    listen = f"127.0.0.1:{free_port()}"
    url = f"tls://{listen}"
    hub = board(tmp_path / "hub", "hub", "", units=("skel",), token="", **certs,
                **{"fleet.serve": "true", "fleet.listen": listen})
    good = board(tmp_path / "good", "good", url, units=("skel",), token="", **certs)
    bad = board(tmp_path / "bad", "bad", url, units=("skel",), token="", **{"fleet.tls_ca": certs["fleet.tls_ca"]})
    stacks = [hub.start(), good.start(), bad.start()]
    try:
        wait_joined(hub, "hub", "good")
        with StackFlowClient(hub.port, timeout=10) as c:
            assert c.request({"request_id": "p", "work_id": "sys@good", "action": "ping"})["error"]["code"] == 0
            time.sleep(1.0)  # long enough for bad's bridge to have tried
            refused = c.request({"request_id": "b", "work_id": "sys@bad", "action": "ping"})
            assert refused["error"]["code"] == -9 and "no board named bad" in refused["error"]["message"], refused
        with StackFlowClient(bad.port, timeout=10) as c:
            alone = c.request({"request_id": "h", "work_id": "sys@hub", "action": "ping"})
            assert alone["error"]["code"] == -9 and "not in a fleet" in alone["error"]["message"], alone
    finally:
        codes = [s.stop(check=False) for s in reversed(stacks)]
    assert codes == [0, 0, 0]
