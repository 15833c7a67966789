"""Credentials between boards (§21.7): a board served nats-server admits only boards with its token."""
from __future__ import annotations

import asyncio
import time

import nats
import pytest

from fleet_support import board, wait_joined
from support import StackFlowClient, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SKEL = {"model": "skel", "response_format": "skel.utf-8", "input": "skel.utf-8", "enoutput": True}


def test_a_board_with_the_wrong_token_cannot_join(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    url = f"nats://{listen}"
    hub = board(tmp_path / "hub", "hub", "", units=("skel",), token="right-token", **{"fleet.serve": "true",
                                                                                        "fleet.listen": listen})
    good = board(tmp_path / "good", "good", url, units=("skel",), token="right-token")
    bad = board(tmp_path / "bad", "bad", url, units=("skel",), token="wrong-token")
    stacks = [hub.start(), good.start(), bad.start()]
    try:
        wait_joined(hub, "hub", "good")
        deadline = time.monotonic() + 30
        while "could not join the fleet" not in bad.log():
            assert time.monotonic() < deadline, bad.log()[-3000:]
            time.sleep(0.2)
        assert "authorization violation" in bad.log().lower()
        with StackFlowClient(hub.port, timeout=10) as c:
            ok = c.request({"request_id": "g", "work_id": "skel@good", "action": "setup", "data": SKEL})
            assert ok["error"]["code"] == 0 and ok["work_id"].endswith("@good"), ok
            c.send({"request_id": "i", "work_id": ok["work_id"], "action": "inference", "object": "skel.utf-8",
                    "data": "secret words"})
            assert c.read_for("i")["data"] == "SECRET WORDS"
            refused = c.request({"request_id": "b", "work_id": "skel@bad", "action": "setup", "data": SKEL})
            assert refused["error"]["code"] == -9 and "no board named bad" in refused["error"]["message"], refused
            listing = c.request({"request_id": "l", "work_id": "sys", "action": "lstask", "data": {"fleet": True}})
            assert set(listing["data"]) == {"hub", "good"}, listing
        with StackFlowClient(bad.port, timeout=10) as c:
            alone = c.request({"request_id": "h", "work_id": "skel@hub", "action": "setup", "data": SKEL})
            assert alone["error"]["code"] == -9 and "not in a fleet" in alone["error"]["message"], alone

        async def eavesdrop(token: str | None) -> str:
            try:
                nc = await nats.connect(url, token=token, allow_reconnect=False, connect_timeout=2,
                                        max_reconnect_attempts=0)
            except Exception as exc:  # nats raises its own error types for a refused login
                return str(exc).lower()
            await nc.close()
            return "connected"

        assert "authorization violation" in asyncio.run(eavesdrop(None))  # no reading subjects either
        assert asyncio.run(eavesdrop("right-token")) == "connected"

        with StackFlowClient(hub.port, timeout=30) as c:  # sys.reset: the bridge answers it and stays
            assert c.request({"request_id": "r", "work_id": "sys", "action": "reset"})["error"]["code"] == 0
            deadline = time.monotonic() + 30
            while "requests to other boards cancelled" not in hub.log():
                assert time.monotonic() < deadline, hub.log()[-3000:]
                time.sleep(0.1)
            wait_joined(hub, "hub", "good")
            again = c.request({"request_id": "g2", "work_id": "skel@good", "action": "setup", "data": SKEL})
            assert again["error"]["code"] == 0, again
    finally:
        codes = [s.stop(check=False) for s in reversed(stacks)]
    assert codes == [0, 0, 0]


def new_seed(path) -> str:
    import os

    import nkeys

    path.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) + b"\n")
    path.chmod(0o600)
    return str(path)


def test_nkey_credentials(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    seed, other = new_seed(tmp_path / "fleet.nk"), new_seed(tmp_path / "other.nk")
    hub = board(tmp_path / "hub", "hub", "", units=("skel",), token="", **{
        "fleet.serve": "true", "fleet.listen": listen, "fleet.nkey_seed": seed})
    good = board(tmp_path / "good", "good", f"nats://{listen}", units=("skel",), token="", **{"fleet.nkey_seed": seed})
    bad = board(tmp_path / "bad", "bad", f"nats://{listen}", units=("skel",), token="", **{"fleet.nkey_seed": other})
    stacks = [hub.start(), good.start(), bad.start()]
    try:
        wait_joined(hub, "hub", "good")
        deadline = time.monotonic() + 30
        while "refused this board's credentials" not in bad.log():
            assert time.monotonic() < deadline, bad.log()[-3000:]
            time.sleep(0.2)
        with StackFlowClient(hub.port, timeout=10) as c:
            assert c.request({"request_id": "p", "work_id": "sys@good", "action": "ping"})["error"]["code"] == 0
            refused = c.request({"request_id": "b", "work_id": "sys@bad", "action": "ping"})
            assert refused["error"]["code"] == -9 and "no board named bad" in refused["error"]["message"], refused
    finally:
        codes = [s.stop(check=False) for s in reversed(stacks)]
    assert codes == [0, 0, 0]
