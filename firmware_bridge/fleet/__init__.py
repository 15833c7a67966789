"""The fleet: this board's units offered to other boards over NATS, and theirs reached from here."""
from dataclasses import dataclass
from typing import Any

from core.registry import FaceInfo, Process


@dataclass(frozen=True)
class FleetSettings:
    """[fleet] in unitbus.toml (protocol.md §21.2): off while url is empty and serve false."""
    url: str = ""  # nats://host:port of a NATS server (comma-separated for a cluster)
    serve: bool = False  # also run a nats-server on this board (on listen)
    listen: str = "127.0.0.1:4222"
    hub: str = ""  # nats-leaf://host:7422 of a hub (comma-separated): the served nats-server is its leaf node
    leaf_listen: str = ""  # host:port where the served nats-server accepts leaf nodes (it is a hub)
    leaf_user: str = "unitbus"  # leaf node credentials, both ends (or the nkey of nkey_seed)
    leaf_password: str = ""
    board: str = ""  # this board's name in work_ids (llm@kitchen); empty: the host name
    token: str = ""  # NATS token; a served nats-server requires it
    nkey_seed: str = ""  # file of an nkey seed (SU...); a served nats-server accepts its public key
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    alive_s: float = 0.5  # each board announces itself this often
    liveness_s: float = 2.0  # a board silent this long is gone: its requests in flight are answered
    discover_s: float = 0.3  # how long a fleet-wide listing waits for boards to answer $SRV.PING
    balance: bool = False  # the HTTP gateways send llm inferences to any board serving the model (llm@*)
    slots: int = 1  # load-balanced inferences this board runs at once; more are answered "busy"
    balance_wait_s: float = 120.0  # how long a load-balanced inference waits for a board that is not busy


NATS_SERVER = Process("nats", "firmware_bridge.fleet.server")


def processes(settings: Any) -> list[Process]:
    if not (settings["fleet.url"] or settings["fleet.serve"]):
        return []
    fleet = Process("fleet", "firmware_bridge.fleet")
    return [NATS_SERVER, fleet] if settings["fleet.serve"] else [fleet]


FACE = FaceInfo("fleet", "firmware_bridge.fleet", settings={"fleet": FleetSettings}, requires=("nats",),
                processes=processes, helpers=(NATS_SERVER,))
