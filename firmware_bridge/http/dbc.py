"""Registration with a DecentralGPT / DeepBrainChain AIComputingNode (http-apis.md §2.10).

Never blocks serving: a failed call is logged and retried with exponential backoff (1 s doubling to 60 s);
after a success the project is registered again every `http.dbc.refresh_s` so a restarted node relearns it.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0


def default_cid() -> str:
    """A stable 12-hex id from the machine id (the standard's container id)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            seed = Path(path).read_text().strip()
            if seed:
                break
        except OSError:
            continue
    else:
        seed = socket.gethostname()
    return hashlib.sha256(f"unitbus:{seed}".encode()).hexdigest()[:12]


class Registrar:
    def __init__(self, settings: Any, models: Callable, api_url: str, on_state: Callable[[str], None]):
        self.settings = settings
        self.node = str(settings["http.dbc.node"]).rstrip("/")
        self.project = settings["http.dbc.project"]
        self.cid = settings["http.dbc.cid"] or default_cid()
        self.models = models  # async () -> list of llm manifests
        self.api_url = api_url
        self.on_state = on_state
        self.refresh_s = float(settings["http.dbc.refresh_s"])

    async def body(self) -> dict[str, Any]:
        wanted = set(self.settings["http.dbc.models"])
        models = [m["mode"] for m in await self.models() if not wanted or m["mode"] in wanted]
        return {"project": self.project,
                "models": [{"model": name, "api": self.api_url, "type": 0, "cid": self.cid} for name in models]}

    async def _post(self, client, path: str, body: dict, timeout: float = 10.0) -> None:
        response = await client.post(self.node + path, json=body, timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {response.status_code}")
        answer = response.json()
        if not isinstance(answer, dict) or answer.get("code", 0) != 0:
            raise RuntimeError(f"{path}: {answer}")

    async def run(self) -> None:
        import httpx

        delay = BACKOFF_START_S
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    await self._post(client, "/api/v0/ai/project/register", await self.body())
                except Exception as exc:  # any failure (network, node error, sys) is retried
                    self.on_state("retrying")
                    log.warning("DecentralGPT registration failed (%s); retrying in %.0f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(BACKOFF_MAX_S, delay * 2)
                    continue
                self.on_state("registered")
                delay = BACKOFF_START_S
                await asyncio.sleep(self.refresh_s)

    async def unregister(self) -> None:
        import httpx

        try:
            async with httpx.AsyncClient() as client:
                await self._post(client, "/api/v0/ai/project/unregister", {"project": self.project}, timeout=2.0)
        except Exception as exc:
            log.warning("DecentralGPT unregister failed: %s", exc)
