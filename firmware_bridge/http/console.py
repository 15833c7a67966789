"""The web console: a page at / and one WebSocket at /console/ws, served by the gateway process.

The page is plain HTML, CSS and JavaScript from firmware_bridge/http/console/ (no build step, no CDN: the
board may be offline). Everything it shows comes over the WebSocket, as JSON messages with a "type":

  chat      an OpenAI chat body (mapped by the OpenAI route's own chat_data) streamed token by token; stop
  raw       StackFlow JSON through the same Connection a TCP client of the bridge gets, replies verbatim
  bus       units (sys.lsunit), tasks and their links (sys.lstask), hwinfo, models (sys.lsmode)
  transcribe / speak   push-to-talk: 16 kHz PCM to the asr unit, text to the tts unit
  handsfree the board's own kws -> asr -> llm -> tts chain, each event forwarded live

The console is a bus client like every other face: it owns no model and no task state of its own beyond
the tasks this page set up, which go when the page does.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

from core import registry
from core.envelope import Request, Response
from core.errors import ErrorCode, UnitError
from core.ids import WorkId
from firmware_bridge.connection import Connection
from firmware_bridge.http.common import same_key
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway, Served, http_error
from firmware_bridge.http.openai import chat_data

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("console")
HELLO_TIMEOUT_S = 10.0
CLOSE_UNAUTHORIZED = 4401  # WebSocket close code: the API key is missing or wrong
PCM_SOURCE = "sys.pcm"
PROGRESS_POLL_S = 0.25
MAX_WORK = 16  # requests of one page answered at the same time (chats, transcriptions, bus views...)


def links(tasks: list[dict]) -> list[dict[str, str]]:
    """What feeds what: an edge from each input that is another task (or the microphone) to its task."""
    known = {t.get("work_id") for t in tasks}
    out = []
    for task in tasks:
        for source in task.get("inputs") or []:
            parsed = WorkId.parse(source) if isinstance(source, str) else None
            if source == PCM_SOURCE or (parsed is not None and parsed.is_task and source in known):
                out.append({"from": source, "to": task["work_id"]})
    return out


def model_entry(manifest: dict) -> dict[str, Any]:
    caps = [c.lower() for c in manifest.get("capabilities", [])]
    return {"mode": manifest["mode"], "type": manifest.get("type", ""), "license": manifest.get("license", ""),
            "capabilities": caps, "grammar": "grammar" in caps}


def fault(exc: Exception) -> dict[str, Any]:
    """A failure as the message the page shows: the StackFlow code where the bus answered one."""
    if isinstance(exc, UnitError):
        exc = http_error(exc)
    if isinstance(exc, GatewayError):
        return {"status": exc.status, "code": exc.code, "unit_code": exc.unit_code, "message": exc.message}
    log.exception("console request failed")
    return {"status": 500, "code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


class Session:
    """One page's WebSocket: its chats, its raw StackFlow connection and its hands-free chain."""

    def __init__(self, ws: WebSocket, gw: Gateway):
        self.ws = ws
        self.gw = gw
        self.client = gw.pool.client
        self.settings = gw.settings
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.queued_bytes = 0
        self.chats: dict[str, asyncio.Task] = {}  # page id -> chat waiting for its model
        self.request_ids: dict[str, str] = {}  # page id -> bus request_id, for stop
        self.work: set[asyncio.Task] = set()
        self.raw: Connection | None = None
        self.chain: list[str] = []  # hands-free work_ids, upstream first
        self.chain_conn: int | None = None
        self.writer: asyncio.Task | None = None

    # outgoing ----------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message, ensure_ascii=False)
        self.queued_bytes += len(text)
        self.outbox.put_nowait(text)

    async def _writer(self) -> None:
        while True:
            text = await self.outbox.get()
            self.queued_bytes -= len(text)
            await self.ws.send_text(text)

    def spawn(self, coro, reply_to: dict) -> None:
        """Run a handler; whatever it raises becomes an error message for the request it answers."""
        async def guarded():
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failed request must not end the page's session
                self.send({"type": "error", "for": reply_to.get("type"), "id": reply_to.get("id"), **fault(exc)})
        if len(self.work) >= MAX_WORK:
            coro.close()
            self.send({"type": "error", "for": reply_to.get("type"), "id": reply_to.get("id"), "status": 429,
                       "code": "rate_limit_exceeded",
                       "message": f"{MAX_WORK} requests of this page are still running; wait for their answers"})
            return
        task = asyncio.create_task(guarded())
        self.work.add(task)
        task.add_done_callback(self.work.discard)

    # the session -------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        writer = self.writer = asyncio.create_task(self._writer())
        try:
            if not await self._hello():
                return
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    self._dispatch(message["text"])
                else:
                    self.send({"type": "error", "status": 400, "code": "invalid_request",
                               "message": "send JSON text messages, not binary ones"})
        except WebSocketDisconnect:
            pass
        finally:
            await self._close()
            await self._drain(writer)

    async def _drain(self, writer: asyncio.Task) -> None:
        while not self.outbox.empty() and not writer.done():
            await asyncio.sleep(0.01)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)

    async def _hello(self) -> bool:
        try:
            hello = json.loads(await asyncio.wait_for(self.ws.receive_text(), HELLO_TIMEOUT_S))
        except (asyncio.TimeoutError, ValueError, KeyError):  # KeyError: a binary frame
            hello = None
        key = self.settings["http.api_key"]
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            self.send({"type": "error", "for": "hello", "status": 400, "code": "invalid_request",
                       "message": 'the first message must be {"type": "hello", "key": ...}'})
            await self._drain_then_close(1008)
            return False
        if key and not same_key(hello.get("key"), key):
            self.send({"type": "error", "for": "hello", "status": 401, "code": "invalid_api_key",
                       "message": "Incorrect API key provided"})
            await self._drain_then_close(CLOSE_UNAUTHORIZED)
            return False
        models = await self.gw.models(("llm", "asr", "tts", "kws"))
        self.send({"type": "hello", "models": [model_entry(m) for m in models]})
        return True

    async def _drain_then_close(self, code: int) -> None:
        while not self.outbox.empty() and not self.writer.done():
            await asyncio.sleep(0.01)
        if not self.writer.done():
            await self.ws.close(code)

    def _dispatch(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError as exc:
            self.send({"type": "error", "status": 400, "code": "invalid_request", "message": f"not JSON: {exc}"})
            return
        kind = message.get("type") if isinstance(message, dict) else None
        handler = {"chat": self.chat, "stop": self.stop, "raw": self.raw_in, "bus": self.bus,
                   "transcribe": self.transcribe, "speak": self.speak, "handsfree": self.handsfree}.get(kind)
        if handler is None:
            self.send({"type": "error", "status": 400, "code": "invalid_request",
                       "message": f"unknown message type {kind!r}"})
            return
        result = handler(message)
        if asyncio.iscoroutine(result):
            self.spawn(result, message)

    async def _close(self) -> None:
        for task in list(self.work):
            task.cancel()  # a chat's stream closes, which pauses its request on the unit
        await asyncio.gather(*self.work, return_exceptions=True)
        if self.raw is not None:
            self.raw.close()
        await self._chain_down()

    # chat --------------------------------------------------------------------------------------
    async def chat(self, message: dict) -> None:
        cid = str(message.get("id", ""))
        body = message.get("body")
        if not isinstance(body, dict):
            raise GatewayError(400, "chat: body must be an OpenAI chat request object", param="body")
        manifest = await self.gw.find(body.get("model"))
        data = chat_data(body, manifest)
        grammar = message.get("grammar")
        if grammar:
            if "format" in data:
                raise GatewayError(400, "use either a JSON schema or a grammar, not both", param="grammar")
            if not isinstance(grammar, dict) or not isinstance(grammar.get("text"), str):
                raise GatewayError(400, 'grammar: expected {"type": "gbnf"|"lark"|..., "text": "..."}',
                                   param="grammar")
            if "grammar" not in model_entry(manifest)["capabilities"]:
                raise GatewayError(400, f"{manifest['mode']} has no constrained decoding", param="grammar")
            data["grammar"] = {"type": str(grammar.get("type") or "gbnf"), "text": grammar["text"]}
        rid = f"console-{uuid.uuid4().hex[:16]}"
        self.chats[cid] = asyncio.current_task()
        try:
            served = await self._acquire(cid, manifest)
        finally:
            self.chats.pop(cid, None)
        self.request_ids[cid] = rid
        self.send({"type": "start", "id": cid, "bus_request_id": rid, "work_id": served.work_id})
        try:
            async for chunk in self.gw.stream(served, data, rid):
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("delta"):
                    self.send({"type": "token", "id": cid, "delta": chunk["delta"]})
                if chunk.get("finish"):
                    self.send({"type": "done", "id": cid, "finish_reason": chunk.get("finish_reason") or "stop",
                               "usage": chunk.get("usage"), "stopped": cid not in self.request_ids})
                    return
            raise GatewayError(500, "the unit ended the request without a final chunk", code="model_error")
        finally:
            self.request_ids.pop(cid, None)

    async def _acquire(self, cid: Any, manifest: dict) -> Served:
        """The pool task of a model; while it loads (converting it first, the first time) the page is told
        the stage and percent the unit reports."""
        acquiring = asyncio.ensure_future(self.gw.acquire(manifest))
        shown = None
        try:
            while True:
                done, _ = await asyncio.wait({acquiring}, timeout=PROGRESS_POLL_S)
                if done:
                    return acquiring.result()
                served = self.gw.served.get((manifest["type"], manifest["mode"]))
                now = {"stage": "loading", "percent": 0, **(served.progress if served is not None else {})}
                if now != shown:
                    self.send({"type": "status", "id": cid, "model": manifest["mode"], **now})
                    shown = now
        finally:
            acquiring.cancel()  # a no-op once done; otherwise only this wait stops, the load goes on

    async def stop(self, message: dict) -> None:
        cid = str(message.get("id", ""))
        waiting = self.chats.pop(cid, None)
        if waiting is not None:  # still waiting for its model: stop waiting (the load itself goes on)
            waiting.cancel()
            self.send({"type": "done", "id": cid, "finish_reason": "stop", "usage": None, "stopped": True})
            return
        rid = self.request_ids.pop(cid, None)
        if rid is None or not await self.gw.cancel(rid):
            self.send({"type": "error", "for": "stop", "id": message.get("id"), "status": 404, "code": "not_found",
                       "message": "that chat is not running"})

    # raw StackFlow -----------------------------------------------------------------------------
    def raw_in(self, message: dict) -> None:
        text = message.get("text")
        if not isinstance(text, str):
            self.send({"type": "error", "for": "raw", "status": 400, "code": "invalid_request",
                       "message": "raw: text must be a string"})
            return
        if self.raw is None:
            # The bridge's own connection logic (framing, envelope, errors), so the replies are the bytes a
            # TCP client of port 10001 reads.
            self.raw = Connection(self.client, self.settings, self._raw_out, lambda: self.queued_bytes,
                                  "console", kind="tcp")
            self.spawn(self._raw_idle(), {"type": "raw"})
        self.raw.received(text.encode())

    async def _raw_idle(self) -> None:
        while self.raw is not None:  # a frame left incomplete is answered after framing.idle_reset_s, as on TCP
            await asyncio.sleep(1.0)
            self.raw.check_idle()

    def _raw_out(self, data: bytes) -> None:
        self.send({"type": "raw", "text": data.decode("utf-8", "replace")})

    # bus view ----------------------------------------------------------------------------------
    def _loads(self) -> list[dict]:
        """Models this gateway is loading (converting first, the first time), with what the unit last reported."""
        return [{"mode": s.mode, "unit": s.unit, "stage": "loading", "percent": 0, **s.progress}
                for s in list(self.gw.served.values()) if s.state == "loading"]

    async def bus(self, message: dict) -> None:
        if message.get("only") == "loads":  # polled often while a load runs: no sys calls (hwinfo takes 1 s)
            self.send({"type": "loads", "loads": self._loads()})
            return
        timeout = float(self.settings["timeouts.control_s"])

        async def sys_call(action: str) -> Any:
            try:
                return (await self.client.call("sys", action, timeout=timeout)).data
            except (UnitError, asyncio.TimeoutError) as exc:
                return {"error": getattr(exc, "message", "") or f"sys.{action} did not answer"}

        running, tasks, hwinfo, lsmode = await asyncio.gather(sys_call("lsunit"), self.gw.tasks(),
                                                              sys_call("hwinfo"), sys_call("lsmode"))
        by_name = {u["unit"]: u for u in running if isinstance(u, dict)} if isinstance(running, list) else {}
        units = []
        for name, info in sorted(registry.installed().items()):
            record = by_name.pop(name, None)
            if record is None and not info.start_by_default:
                continue
            units.append({"unit": name, "state": "running" if record else "not running", **(record or {})})
        units += [{"state": "running", **record} for record in by_name.values()]
        models = [model_entry(m) for m in lsmode if isinstance(m, dict) and "mode" in m] \
            if isinstance(lsmode, list) else []
        self.send({"type": "bus", "units": units, "tasks": tasks, "links": links(tasks), "hwinfo": hwinfo,
                   "models": models, "loads": self._loads(),
                   "error": running.get("error") if isinstance(running, dict) else None})

    # voice -------------------------------------------------------------------------------------
    async def _first_model(self, kind: str) -> dict:
        models = await self.gw.models((kind,))
        if not models:
            raise GatewayError(404, f"no {kind} model is installed", code="model_not_found")
        return models[0]

    async def transcribe(self, message: dict) -> None:
        try:
            pcm = base64.b64decode(message.get("pcm") or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise GatewayError(400, "transcribe: pcm must be base64 of 16 kHz S16LE samples", param="pcm") from None
        if len(pcm) < 3200:
            raise GatewayError(400, "transcribe: less than 0.1 s of audio; hold the button while you speak",
                               param="pcm")
        manifest = await self._first_model("asr")
        served = await self._acquire(message.get("id"), manifest)
        answer = await self.gw.call(served, "asr.pcm.base64", base64.b64encode(pcm).decode(),
                                    f"console-asr-{uuid.uuid4().hex[:12]}")
        texts = [(item.get("delta") if isinstance(item, dict) else item) for item in answer]
        text = " ".join(t.strip() for t in texts if isinstance(t, str) and t.strip())
        self.send({"type": "transcript", "id": message.get("id"), "text": text})

    async def speak(self, message: dict) -> None:
        text = message.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > 4096:
            raise GatewayError(400, "speak: text must be 1..4096 characters", param="text")
        manifest = await self._first_model("tts")
        served = await self._acquire(message.get("id"), manifest)
        answer = await self.gw.call(served, "tts.utf-8", text, f"console-tts-{uuid.uuid4().hex[:12]}")
        pcm = b"".join(base64.b64decode(item["delta"] if isinstance(item, dict) else item)
                       for item in answer if (item.get("delta") if isinstance(item, dict) else item))
        self.send({"type": "speech", "id": message.get("id"), "rate": int(served.setup.get("audio_rate", 16000)),
                   "pcm": base64.b64encode(pcm).decode()})

    # hands-free --------------------------------------------------------------------------------
    async def handsfree(self, message: dict) -> None:
        if not message.get("on"):
            await self._chain_down()
            self.send({"type": "handsfree", "on": False, "tasks": []})
            return
        if self.chain_conn is not None:  # already on (or being set up)
            self.send({"type": "handsfree", "on": True, "tasks": self.chain})
            return
        wake = str(message.get("wake") or "HEY JARVIS")
        temperature = message.get("temperature")
        sampling = {"temperature": temperature} \
            if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) else {}
        kws, asr, llm, tts = [await self._first_model(k) for k in ("kws", "asr", "llm", "tts")]
        self.chain_conn = self.client.open_conn(self._chain_event)
        plan = [("kws", {"model": kws["mode"], "response_format": "kws.bool", "input": PCM_SOURCE,
                         "enoutput": True, "kws": wake}),
                ("asr", {"model": asr["mode"], "response_format": "asr.utf-8.stream",
                         "input": [PCM_SOURCE, "{kws}"], "enoutput": True}),
                ("llm", {"model": llm["mode"], "response_format": "llm.utf-8.stream",
                         "input": ["llm.utf-8", "{asr}", "{kws}"], "enoutput": True, "max_token_len": 96,
                         "prompt": str(message.get("prompt") or "You are a voice assistant. Answer briefly."),
                         **sampling}),
                ("tts", {"model": tts["mode"], "response_format": "sys.pcm",
                         "input": ["tts.utf-8", "{llm}", "{kws}"], "enoutput": False})]
        ids: dict[str, str] = {}
        try:
            for unit, data in plan:
                data["input"] = [i.format(**ids) for i in data["input"]] if isinstance(data["input"], list) \
                    else data["input"]
                response = await self._chain_setup(unit, data)
                if response is not None and response.code == ErrorCode.TASK_FULL and await self._free(unit):
                    response = await self._chain_setup(unit, data)
                if response is None or response.code != 0:
                    raise GatewayError(503, f"hands-free: {unit} setup failed: "
                                            f"{response.message if response else 'no reply'}",
                                       unit_code=response.code if response else None)
                ids[unit] = response.work_id
                self.chain.append(response.work_id)
                self.send({"type": "event", "work_id": response.work_id, "object": "setup", "data": data})
        except BaseException:
            await self._chain_down()
            raise
        self.send({"type": "handsfree", "on": True, "tasks": self.chain})

    async def _chain_setup(self, unit: str, data: dict) -> Response | None:
        request = Request(f"console-hf-{unit}", unit, "setup", f"{unit}.setup", data)
        return await self.client.request(request, conn=self.chain_conn,
                                         timeout=float(self.settings["timeouts.setup_s"]) + 5)

    async def _free(self, unit: str) -> bool:
        """Unload the gateway's idle tasks of a unit (push-to-talk's asr and tts, kept for their
        keep-alive) so the chain can have the unit's task; False when there were none."""
        idle = [s for s in list(self.gw.served.values()) if s.unit == unit and not s.inflight and s.state == "loaded"]
        for served in idle:
            await self.gw.unload(served.mode, served.unit)
        return bool(idle)

    def _chain_event(self, response: Response, final: bool) -> None:
        self.send({"type": "event", "work_id": response.work_id, "object": response.object, "data": response.data,
                   "code": response.code, "message": response.message})

    async def _chain_down(self) -> None:
        chain, self.chain = self.chain, []
        for work_id in reversed(chain):
            try:
                await self.client.call(work_id, "exit", timeout=5.0)
            except (UnitError, asyncio.TimeoutError) as exc:
                log.warning("hands-free: exit %s: %s", work_id, exc)
        if self.chain_conn is not None:
            self.client.close_conn(self.chain_conn)
            self.chain_conn = None


def create(gw: Gateway) -> FastAPI:
    """The console's own app: the page and its static files are public (they hold no data); the
    WebSocket asks for [http] api_key when one is set."""
    app = FastAPI(title="unitbus console", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.websocket("/console/ws")
    async def socket(ws: WebSocket) -> None:
        await Session(ws, gw).run()

    return app


class Combined:
    """The console at / and /console/ in front of another listener's app (the OpenAI port)."""

    def __init__(self, api_app, console_app):
        self.api_app = api_app
        self.console_app = console_app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] in ("http", "websocket") else ""
        target = self.console_app if path == "/" or path.startswith("/console/") else self.api_app
        await target(scope, receive, send)
