"""The `unitbus` command: up, call, run, models, install-systemd."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from core import logs, registry
from core.settings import Settings, SettingsError, parse_assignments

log = logging.getLogger("unitbus")

CORE_SERVICES = ("unitbus-sys.service", "unitbus-unit@.service")


def service_name(process: str) -> str:
    return f"unitbus-{process}.service"


def face_processes() -> dict[str, str]:
    """Every process a face may run, by name: its module."""
    processes: dict[str, str] = {}
    for face in registry.faces().values():
        processes[face.name] = face.module
        processes.update((helper.name, helper.module) for helper in face.helpers)
    return processes


def _settings(args: argparse.Namespace) -> tuple[Settings, dict[str, Any]]:
    overrides = parse_assignments(args.set)
    if getattr(args, "units", None):
        overrides["up.units"] = args.units
    if getattr(args, "port", None):
        overrides["tcp.port"] = str(args.port)
    if getattr(args, "run_dir", None):
        overrides["bus.run_dir"] = args.run_dir
    return Settings.load(args.config, overrides), overrides


# up --------------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from core.supervisor import Supervisor, plan

    settings, overrides = _settings(args)
    logs.configure(settings["log.level"], "up")
    settings.bus_key()  # an untrusted run dir stops everything here, with its reason, before any child starts
    children = plan(settings)

    async def announce_ready() -> None:
        from core.client import BusClient

        units = [c.name for c in children if c.name in registry.installed()]
        async with BusClient.for_settings(settings, "up") as client:
            for _ in range(int(float(settings["timeouts.setup_s"]) * 10)):
                try:
                    response = await client.call("sys", "version2", timeout=1.0)
                    registered = {v.split("-")[0][len("llm_"):] for v in response.data}
                    if all(u in registered for u in units):
                        break
                except Exception:  # sys still starting: keep asking
                    pass
                await asyncio.sleep(0.1)
        started = {c.name for c in children}
        parts = [f"sys on {settings.bus_endpoint()}"]
        for face in registry.faces().values():
            if face.name not in started:
                continue
            listeners = face.listening(settings)
            for listener in listeners:
                await wait_for_port(listener.host, listener.port, float(settings["timeouts.setup_s"]))
            where = ", ".join(f"{lst.label} {lst.host}:{lst.port}" for lst in listeners) or "no port"
            parts.append(f"{face.name} on {where}")
        parts.append(f"units: {' '.join(units) or 'none'}")
        print("unitbus up: " + ", ".join(parts), flush=True)

    return asyncio.run(Supervisor(children, overrides, args.config).run(announce_ready))


async def wait_for_port(host: str, port: int, timeout: float) -> bool:
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return True
    return False


# call ------------------------------------------------------------------------------------------
def cmd_call(args: argparse.Namespace) -> int:
    from core.client import BusClient
    from core.envelope import EnvelopeError, Request, decode_request

    settings, _ = _settings(args)
    logs.configure("WARNING")
    if args.request.lstrip().startswith("{"):
        try:
            request = decode_request(args.request.encode())
        except EnvelopeError as exc:
            print(f"unitbus call: not a valid request: {exc.message}", file=sys.stderr)
            return 2
    else:
        if args.action is None:
            print("unitbus call: give a JSON request, or WORK_ID ACTION", file=sys.stderr)
            return 2
        data: Any = "None"
        if args.data is not None:
            try:
                data = json.loads(args.data)
            except ValueError:
                data = args.data
        request = Request("cli", args.request, args.action, args.object or "None", data)

    async def run() -> int:
        code = 0
        async with BusClient.for_settings(settings, "cli") as client:
            try:
                async for response in client.stream(request, conn=client.open_conn(), timeout=args.timeout):
                    if args.pretty:
                        print(json.dumps(response.to_dict(), ensure_ascii=False, indent=2, sort_keys=True))
                    else:
                        sys.stdout.buffer.write(response.encode())
                    sys.stdout.flush()
                    code = code or (1 if response.code else 0)
                    if request.action == "setup" or (request.action != "inference" and not _is_stream(response)):
                        break
            except asyncio.TimeoutError:
                print(f"unitbus call: no answer within {args.timeout:g} s (is `unitbus up` running?)", file=sys.stderr)
                return 3
        return code

    return asyncio.run(run())


def _is_stream(response: Any) -> bool:
    return isinstance(response.data, dict) and "finish" in response.data and not response.data["finish"]


# run -------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Run one process in the foreground (what the systemd units start)."""
    import runpy

    module = {"sys": "core.sys", **face_processes()}.get(args.process)
    if module is None:
        info = registry.installed().get(args.process)
        if info is None:
            print(f"unitbus run: no process or installed unit named {args.process} "
                  f"(processes: sys {' '.join(face_processes())}; units: {' '.join(registry.installed())})",
                  file=sys.stderr)
            return 2
        module = info.module
    sys.argv = [module, *(["--config", args.config] if args.config else []), *sum((["--set", s] for s in args.set), [])]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


# models ----------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from core.manifest import Manifest, ManifestStore

    settings, _ = _settings(args)
    logs.configure("INFO")
    store = ManifestStore(settings)
    manifest: Manifest | None
    if args.models_command == "list":
        for manifest in store.all():
            print(f"{manifest.mode:32} {manifest.type:5} {manifest.data.get('license', '')}")
        return 0
    manifest = next((m for m in store.all() if m.mode == args.name or args.name in m.aliases), None)
    if manifest is None:
        print(f"unitbus models convert: no manifest named {args.name} (see `unitbus models list`)", file=sys.stderr)
        return 2
    converter = next((info.converter for info in registry.installed().values()
                      if manifest.type in info.types and info.converter), "")
    if not converter:
        print(f"{manifest.mode}: runs its files directly, nothing to convert")
        return 0
    import importlib

    module_name, _, function = converter.partition(":")
    path = getattr(importlib.import_module(module_name), function)(manifest.data, force=args.force)
    print(f"{manifest.mode}: converted into {path}")
    return 0


# systemd ---------------------------------------------------------------------------------------
def systemd_source_dir() -> Path:
    for candidate in (Path(__file__).resolve().parent.parent / "systemd", Path(sys.prefix) / "share/unitbus/systemd"):
        if (candidate / CORE_SERVICES[0]).is_file():
            return candidate
    raise FileNotFoundError("the systemd unit files are not installed")


SYSUSERS = "unitbus.sysusers"  # installed as <sysusers.d>/unitbus.conf


class InstallError(Exception):
    pass


def render_services(target: Path, executable: str) -> list[Path]:
    """Copy the unit files into `target`, pointing ExecStart at this installation's `unitbus`."""
    source = systemd_source_dir()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    # A face installed from elsewhere that ships no unit file here runs under `unitbus up` only.
    faces = [service_name(process) for process in face_processes()]
    for name in [*CORE_SERVICES, *(f for f in faces if (source / f).is_file())]:
        text = (source / name).read_text().replace("/usr/local/bin/unitbus", executable)
        path = target / name
        path.write_text(text)
        written.append(path)
    return written


def install_user(sysusers_dir: Path, root: Path | None) -> Path:
    """Install the sysusers.d file of the services' user; with `root`, create the user there too."""
    sysusers_dir.mkdir(parents=True, exist_ok=True)
    path = sysusers_dir / "unitbus.conf"
    shutil.copyfile(systemd_source_dir() / SYSUSERS, path)
    if root is not None:
        import subprocess

        program = shutil.which("systemd-sysusers")
        if program is None:
            raise InstallError("systemd-sysusers is missing (apt-get install systemd): it creates the user "
                               "unitbus that the services run as")
        result = subprocess.run([program, f"--root={root}", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            raise InstallError(f"systemd-sysusers could not create the user unitbus: {result.stderr.strip()}")
    return path


def cmd_install_systemd(args: argparse.Namespace) -> int:
    executable = args.executable or shutil.which("unitbus") or os.path.abspath(sys.argv[0])
    # --target is a staging folder: every file goes there and nothing is created. Otherwise the files go
    # into the system (or the image at --root) and the user the services run as is created in it.
    root = None if args.target else Path(args.root)
    target = Path(args.target) if args.target else Path(args.root) / "etc/systemd/system"
    written = render_services(target, executable)
    try:
        written.append(install_user(target if args.target else Path(args.root) / "etc/sysusers.d", root))
    except InstallError as exc:
        print(f"unitbus install-systemd: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"installed {path}")
    if root is not None:
        print(f"user unitbus created (or already there) in {root / 'etc/passwd'}")
    if args.enable and shutil.which("systemctl"):
        import subprocess

        subprocess.run(["systemctl", "daemon-reload"], check=False)
        settings = Settings.load()
        faces = [service_name(process.name) for face in registry.faces().values() if face.available()
                 for process in face.planned(settings)]
        units = [CORE_SERVICES[0], *faces, *(f"unitbus-unit@{u}.service" for u in args.units or registry.default_units())]
        subprocess.run(["systemctl", "enable", "--now", *units], check=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unitbus", description="AI units on a bus, StackFlow-compatible")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="path of unitbus.toml (default /etc/unitbus/unitbus.toml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
        p.add_argument("--run-dir", help="folder for the bus sockets (bus.run_dir)")

    up = sub.add_parser("up", help="run sys, the bridge and the units until Ctrl-C")
    common(up)
    up.add_argument("--units", nargs="*", help="units to start (default: up.units)")
    up.add_argument("--port", type=int, help="TCP port of the StackFlow bridge (tcp.port)")
    up.set_defaults(func=cmd_up)

    call = sub.add_parser("call", help="send one request and print the replies")
    common(call)
    call.add_argument("request", help='a JSON request, or a work_id such as "sys" followed by an action')
    call.add_argument("action", nargs="?", help="the action, when a work_id was given")
    call.add_argument("--data", help="data (JSON, or plain text)")
    call.add_argument("--object", help="object type of data")
    call.add_argument("--pretty", action="store_true", help="indent the JSON")
    call.add_argument("--timeout", type=float, default=130.0, help="seconds to wait for each message")
    call.set_defaults(func=cmd_call)

    run = sub.add_parser("run", help="run one process in the foreground: sys, a face's process (bridge, http, "
                                     "wyoming, fleet, nats) or a unit name")
    common(run)
    run.add_argument("process")
    run.set_defaults(func=cmd_run)

    models = sub.add_parser("models", help="list manifests or convert a model")
    common(models)
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list")
    convert = models_sub.add_parser("convert")
    convert.add_argument("name")
    convert.add_argument("--force", action="store_true", help="convert again even if cached")
    models.set_defaults(func=cmd_models)

    systemd = sub.add_parser("install-systemd", help="install the systemd unit files")
    systemd.add_argument("--target", help="a folder for the files alone (default: install into the system, "
                                          "creating the user unitbus the services run as)")
    systemd.add_argument("--root", default="/", help="the system to install into (an image's root folder)")
    systemd.add_argument("--executable", help="path of the unitbus command for ExecStart")
    systemd.add_argument("--enable", action="store_true", help="daemon-reload and enable --now")
    systemd.add_argument("--units", nargs="*", help="units to enable (default: up.units)")
    systemd.set_defaults(func=cmd_install_systemd)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except SettingsError as exc:
        print(f"unitbus: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
