"""spinboxctl: look at and control spinbox's VMs (through spinboxd's D-Bus API only)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinbox.busclient import BusClient, SpinboxdError
from spinbox.busnames import MANAGER_IFACE, MANAGER_PATH, VM_IFACE
from spinbox.cli import check, top
from spinbox.config import CONFIG_PATH, Config, ConfigError, load
from spinbox.vmid import DEFAULT_NAMESPACE, vm_id_for


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


class Spinboxd:
    """What spinboxctl asks of org.spinstack.Spinbox."""

    def __init__(self, client: BusClient) -> None:
        self.client = client

    @classmethod
    async def connect(cls, address: str | None) -> Spinboxd:
        return cls(await BusClient.connect(address))

    async def call(self, path: str, interface: str, member: str, signature: str = "", body: Any = ()) -> Any:
        return await self.client.call(path, interface, member, signature, body)

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        return await self.client.properties(path, interface)

    async def vm_path(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> str:
        """The VM of container `name` in the containerd namespace, or else the VM whose id is `name`."""
        for vm_id in candidates(name, namespace):
            try:
                (path,) = await self.call(MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", [vm_id])
            except SpinboxdError as error:
                if error.kind != "NotFound":
                    raise
                continue
            return str(path)
        raise SpinboxdError(
            "NotFound",
            f"there is no VM for container {name!r} in namespace {namespace!r}, nor a VM with that id "
            "(spinboxctl list shows them)",
        )

    async def vms(self) -> list[dict[str, Any]]:
        (paths,) = await self.call(MANAGER_PATH, MANAGER_IFACE, "ListVMs")
        return [await self.properties(p, VM_IFACE) for p in paths]


def candidates(name: str, namespace: str) -> list[str]:
    """The VM ids `name` may mean: its container's VM in `namespace` first, then a VM id as given."""
    return list(dict.fromkeys([vm_id_for(namespace, name), name]))


def _mib(resources: dict[str, Any]) -> str:
    return f"{resources.get('memory-mib', '?')} MiB"


async def cmd_list(client: Spinboxd, args: argparse.Namespace) -> int:
    if args.quiet:
        for vm in await client.vms():
            print(vm["Id"])
        return 0
    rows = [
        [
            vm.get("Namespace") or "-",
            vm.get("ContainerId") or "-",
            vm["Id"],
            vm["State"],
            str(vm["Pid"]),
            # Resources is root's (or polkit's read-spec action's) alone.
            str(vm.get("Resources", {}).get("vcpus", "?")),
            _mib(vm.get("Resources", {})),
            vm["Scope"],
        ]
        for vm in await client.vms()
    ]
    print(table(["NAMESPACE", "CONTAINER", "ID", "STATE", "PID", "VCPUS", "MEMORY", "SCOPE"], rows))
    return 0


async def cmd_status(client: Spinboxd, args: argparse.Namespace) -> int:
    vm = await client.properties(await client.vm_path(args.id, args.namespace), VM_IFACE)
    resources = vm.get("Resources", {})
    rows = [
        ["Id", vm["Id"]],
        ["Namespace", vm.get("Namespace") or "-"],
        ["Container", vm.get("ContainerId") or "-"],
        ["State", vm["State"]],
        ["QEMU pid", str(vm["Pid"])],
        ["Scope", vm["Scope"]],
        ["Agent", vm["AgentAddress"]],
        ["Rootfs (guest)", vm["RootfsPath"] or "-"],
        ["Addresses", " ".join(vm.get("Addresses", [])) or "-"],
        ["vCPUs", str(resources.get("vcpus", "?"))],
        ["Memory", _mib(resources)],
        ["MemoryMax", str(resources.get("memory-max", "?"))],
        ["Accelerator", str(resources.get("accelerator", "?"))],
    ]
    rows += [[f"Annotation {k}", v] for k, v in sorted(resources.get("annotations", {}).items())]
    print(table(["PROPERTY", "VALUE"], rows))
    return 0


async def cmd_timeline(client: Spinboxd, args: argparse.Namespace) -> int:
    vm = await client.properties(await client.vm_path(args.id, args.namespace), VM_IFACE)
    phases = sorted(vm["BootTimeline"].items(), key=lambda item: item[1])
    rows = []
    previous = 0.0
    for name, seconds in phases:
        rows.append([name, f"{seconds:.3f}", f"+{seconds - previous:.3f}"])
        previous = seconds
    print(table(["PHASE", "SECONDS", "DELTA"], rows))
    return 0


async def cmd_stop(client: Spinboxd, args: argparse.Namespace) -> int:
    path = await client.vm_path(args.id, args.namespace)
    await client.call(path, VM_IFACE, "Stop", "t", [int(args.timeout * 1000)])
    return 0


async def cmd_kill(client: Spinboxd, args: argparse.Namespace) -> int:
    await client.call(await client.vm_path(args.id, args.namespace), VM_IFACE, "Kill")
    return 0


async def logs_argv(args: argparse.Namespace) -> list[str]:
    """journalctl for the VM's scope; for a VM spinboxd no longer has (its logs
    stay in the journal), for the scopes of every id `args.id` may mean."""
    try:
        client = await Spinboxd.connect(args.address)
        units = [(await client.properties(await client.vm_path(args.id, args.namespace), VM_IFACE))["Scope"]]
    except SpinboxdError:
        units = [f"spinbox-vm-{vm_id}.scope" for vm_id in candidates(args.id, args.namespace)]
    argv = ["journalctl", "--no-pager", *(arg for unit in units for arg in ("-u", unit))]
    if args.follow:
        argv.append("--follow")
    if args.lines is not None:
        argv += ["-n", str(args.lines)]
    return argv


def cmd_logs(args: argparse.Namespace) -> int:
    argv = asyncio.run(logs_argv(args))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


async def top_rows(client: Spinboxd, interval: float) -> list[list[str]]:
    """One row per VM: its CPU use over `interval` seconds, its CPU time and memory now."""
    vms = await client.vms()
    mounts = top.cgroup2_mounts()
    cgroups = [top.cgroup_of(int(vm["Pid"]), mounts) for vm in vms]
    before = [top.read_usage(cgroup) for cgroup in cgroups]
    await asyncio.sleep(interval)
    rows = []
    for vm, cgroup, first in zip(vms, cgroups, before, strict=True):
        now = top.read_usage(cgroup)
        usage = [
            top.cpu_percent(first, now),
            top.cpu_time(now),
            top.memory(now),
            _mib(vm.get("Resources", {})),
        ]
        rows.append([vm.get("Namespace") or "-", vm.get("ContainerId") or "-", vm["Id"], vm["State"], *usage])
    return rows


async def cmd_top(client: Spinboxd, args: argparse.Namespace) -> int:
    headers = ["NAMESPACE", "CONTAINER", "ID", "STATE", "CPU%", "CPU TIME", "MEMORY", "RAM"]
    while True:
        rows = await top_rows(client, args.interval)
        if not args.once and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # home and clear: the table refreshes in place
        print(table(headers, rows), flush=True)
        if args.once:
            return 0


async def cmd_check(address: str | None, config_path: Path) -> int:
    config_error = None
    try:
        config = load(config_path)
    except ConfigError as e:
        config, config_error = Config(), str(e)
    rows = check.host_rows(config, config_error)
    try:
        client = await Spinboxd.connect(address)
        props = await client.properties(MANAGER_PATH, MANAGER_IFACE)
        rows.append(["spinboxd", "ok", f"version {props['Version']}, accelerator {props['Accelerator']}"])
        for sentence in props.get("Leftovers", []):
            rows.append(["leftover", "warn", str(sentence)])
    except SpinboxdError as e:
        rows.append(["spinboxd", "FAIL", f"not reachable: {e.message}"])
    print(table(["CHECK", "RESULT", "DETAIL"], rows))
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinboxctl", description="Inspect and control spinbox VMs.")
    p.add_argument("--address", help="D-Bus address of the system bus (default: the system bus)")
    sub = p.add_subparsers(dest="command", required=True)
    list_parser = sub.add_parser("list", help="list VMs")
    list_parser.add_argument("-q", "--quiet", action="store_true", help="print only the VM ids, one a line")

    def with_id(name: str, text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=text)
        command.add_argument("id", help="a container id (in the namespace of -n) or a VM id")
        command.add_argument(
            "-n",
            "--namespace",
            default=DEFAULT_NAMESPACE,
            help=f"containerd namespace of the container (default: {DEFAULT_NAMESPACE})",
        )
        return command

    with_id("status", "show one VM")
    with_id("timeline", "show a VM's boot timeline")
    with_id("kill", "kill a VM")
    stop = with_id("stop", "stop a VM")
    stop.add_argument("--timeout", type=float, default=10, help="seconds before QEMU is killed")
    logs = with_id("logs", "a VM's logs (QEMU, console, vminitd) from the journal")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines as they come")
    top_parser = sub.add_parser("top", help="each VM's CPU and memory, refreshed")
    top_parser.add_argument("--once", action="store_true", help="print one table and exit")
    top_parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    logs.add_argument("--lines", type=int, help="show only the last LINES lines")
    check = sub.add_parser("check", help="is this host ready to run spinbox VMs?")
    check.add_argument("--config", type=Path, default=CONFIG_PATH)
    return p


COMMANDS = {
    "list": cmd_list,
    "status": cmd_status,
    "timeline": cmd_timeline,
    "stop": cmd_stop,
    "kill": cmd_kill,
    "top": cmd_top,
}


async def run(args: argparse.Namespace) -> int:
    if args.command == "check":
        return await cmd_check(args.address, args.config)
    client = await Spinboxd.connect(args.address)
    return await COMMANDS[args.command](client, args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "logs":
            return cmd_logs(args)
        return asyncio.run(run(args))
    except SpinboxdError as e:
        print(f"spinboxctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
