"""What crosses NATS between boards: subjects and one msgpack body per message (protocol.md §21)."""
from __future__ import annotations

import socket
from typing import Any

import msgpack

from core.ids import BOARD_NAME

SERVICE = "unitbus"  # the micro service every board's bridge adds ($SRV.PING.unitbus finds them all)
ORIGIN_HEADER = "Unitbus-Origin"  # "<board>/<client>/<conn>": the connection a request comes from
CALL_HEADER = "Unitbus-Call"  # one request's key (its reply inbox): what a cancel names
GONE = "unitbus.gone"  # a connection (or a whole client) on some board went away
CANCEL = "unitbus.cancel"  # the requester stopped waiting for one request (a closed HTTP client)
MODEL_QUEUE = "unitbus-model"  # the queue group of every model subject: one board takes each request
UNLINK = "unitbus.unlink"  # a board no longer takes a source it imported (or the source went away)
SOURCE_HEADER = "Unitbus-Source"  # a linked output's source, in the remote form (`asr.1001@mic`)
RESPONSE_HEADER = "Unitbus-Response"  # a linked output's envelope (JSON) when there is one


def board_subject(board: str) -> str:
    return f"unitbus.board.{board}"


def model_subject(mode: str) -> str:
    """The load-balanced subject of a model; characters a subject token cannot hold are escaped."""
    return "unitbus.model." + "".join(c if c.isalnum() or c in "-_" else f"~{ord(c):x}" for c in mode)


def link_subject(board: str) -> str:
    """Outputs of sources on other boards that `board` imported: the payload is the PCM itself."""
    return f"unitbus.link.{board}"


def free_subject(model_subject_or_any: str) -> str:
    """Where a board says it finished a load-balanced inference of a model (its model subject's last token)."""
    return "unitbus.free." + model_subject_or_any.rsplit(".", 1)[-1]


def model_subject_of_free(subject: str) -> str:
    return "unitbus.model." + subject.rsplit(".", 1)[-1]


def alive_subject(board: str) -> str:
    return f"unitbus.alive.{board}"


def sink_subject(board: str) -> str:
    """Outputs a remote task sends on its own (not replies) to connections of `board`."""
    return f"unitbus.sink.{board}"


class WireError(ValueError):
    pass


def pack(**body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True, unicode_errors="surrogatepass")


def unpack(data: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(data, raw=False, unicode_errors="surrogatepass")
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(f"undecodable fleet message: {exc}") from None
    if not isinstance(body, dict):
        raise WireError("a fleet message is a map")
    return body


def board_name(configured: str) -> str:
    """fleet.board, or the host name made into a valid board name."""
    name = configured or "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:64]
    if not BOARD_NAME.fullmatch(name):
        raise ValueError(f"fleet.board {name!r}: use 1-64 letters, digits, '-' or '_'")
    return name


def fleet_urls(settings) -> list[str]:
    """The NATS servers to join: fleet.url, else the server this board serves."""
    if settings["fleet.url"]:
        return [u.strip() for u in str(settings["fleet.url"]).split(",") if u.strip()]
    scheme = "tls" if settings["fleet.tls_cert"] else "nats"
    return [f"{scheme}://{settings['fleet.listen']}"]


def fleet_enabled(settings) -> bool:
    return bool(settings["fleet.url"]) or bool(settings["fleet.serve"])
