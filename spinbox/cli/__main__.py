"""spinboxctl: look at and control spinbox's VMs (through spinboxd's D-Bus API only)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinbox.busclient import BusClient, SpinboxdError
from spinbox.busnames import MANAGER_IFACE, MANAGER_PATH, VM_IFACE
from spinbox.config import CONFIG_PATH, Config, ConfigError, load
from spinbox.host import KvmHost

CNI_PLUGIN_PATH = ("/usr/lib/cni", "/opt/cni/bin")


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

    async def vm_path(self, vm_id: str) -> str:
        (path,) = await self.call(MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", [vm_id])
        return str(path)

    async def vms(self) -> list[dict[str, Any]]:
        (paths,) = await self.call(MANAGER_PATH, MANAGER_IFACE, "ListVMs")
        return [await self.properties(p, VM_IFACE) for p in paths]


def _mib(resources: dict[str, Any]) -> str:
    return f"{resources.get('memory-mib', '?')} MiB"


async def cmd_list(client: Spinboxd, args: argparse.Namespace) -> int:
    rows = [
        [
            vm["Id"],
            vm["State"],
            str(vm["Pid"]),
            str(vm["Resources"].get("vcpus", "?")),
            _mib(vm["Resources"]),
            vm["Scope"],
        ]
        for vm in await client.vms()
    ]
    print(table(["ID", "STATE", "PID", "VCPUS", "MEMORY", "SCOPE"], rows))
    return 0


async def cmd_status(client: Spinboxd, args: argparse.Namespace) -> int:
    vm = await client.properties(await client.vm_path(args.id), VM_IFACE)
    resources = vm["Resources"]
    rows = [
        ["Id", vm["Id"]],
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
    vm = await client.properties(await client.vm_path(args.id), VM_IFACE)
    phases = sorted(vm["BootTimeline"].items(), key=lambda item: item[1])
    rows = []
    previous = 0.0
    for name, seconds in phases:
        rows.append([name, f"{seconds:.3f}", f"+{seconds - previous:.3f}"])
        previous = seconds
    print(table(["PHASE", "SECONDS", "DELTA"], rows))
    return 0


async def cmd_stop(client: Spinboxd, args: argparse.Namespace) -> int:
    path = await client.vm_path(args.id)
    await client.call(path, VM_IFACE, "Stop", "t", [int(args.timeout * 1000)])
    return 0


async def cmd_kill(client: Spinboxd, args: argparse.Namespace) -> int:
    await client.call(await client.vm_path(args.id), VM_IFACE, "Kill")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    argv = ["journalctl", "--no-pager", "-u", f"spinbox-vm-{args.id}.scope"]
    if args.follow:
        argv.append("--follow")
    if args.lines is not None:
        argv += ["-n", str(args.lines)]
    os.execvp(argv[0], argv)


def _check_rows(config: Config, config_error: str | None) -> list[list[str]]:
    rows: list[list[str]] = []

    def row(name: str, ok: bool, detail: str, warn: bool = False) -> None:
        rows.append([name, "ok" if ok else ("warn" if warn else "FAIL"), detail])

    row("config", config_error is None, config_error or f"{CONFIG_PATH} (or defaults)")
    usable, reason = KvmHost().usable()
    row("kvm", usable, reason or "/dev/kvm is usable", warn=True)
    wanted = config.vm.accel
    if wanted == "kvm" and not usable:
        row("accelerator", False, 'vm.accel is "kvm" but KVM is not usable')
    elif wanted == "tcg" or not usable:
        row("accelerator", True, "tcg: VMs run under emulation (much slower than KVM)")
    else:
        row("accelerator", True, "kvm")
    qemu = shutil.which("qemu-system-x86_64")
    row("qemu", qemu is not None, qemu or "qemu-system-x86_64 not found (apt install qemu-system-x86)")
    kernel = config.vm.kernel_path()
    row(
        "guest kernel",
        kernel is not None and kernel.exists(),
        str(kernel) if kernel else "no /boot/vmlinuz-*-cloud-amd64 (apt install linux-image-cloud-amd64)",
    )
    initrd = config.vm.initrd_path
    row(
        "guest image",
        initrd.exists(),
        str(initrd) if initrd.exists() else f"{initrd} missing: run spinbox-mkguest",
    )
    plugin_path = config.network_table.get("plugin-path", CNI_PLUGIN_PATH)
    dirs = [plugin_path] if isinstance(plugin_path, str) else list(plugin_path)
    cni = [d for d in dirs if (Path(d) / "bridge").exists()]
    row(
        "CNI plugins",
        bool(cni),
        cni[0] if cni else "no bridge plugin in " + ", ".join(map(str, dirs)),
    )
    containerd = shutil.which("containerd")
    row("containerd", containerd is not None, containerd or "containerd not found (apt install containerd)")
    shim = shutil.which("containerd-shim-spinbox-v1")
    row("shim", shim is not None, shim or "containerd-shim-spinbox-v1 not on PATH", warn=True)
    row("tun", Path("/dev/net/tun").exists(), "/dev/net/tun")
    return rows


async def cmd_check(address: str | None, config_path: Path) -> int:
    config_error = None
    try:
        config = load(config_path)
    except ConfigError as e:
        config, config_error = Config(), str(e)
    rows = _check_rows(config, config_error)
    try:
        client = await Spinboxd.connect(address)
        props = await client.properties(MANAGER_PATH, MANAGER_IFACE)
        rows.append(["spinboxd", "ok", f"version {props['Version']}, accelerator {props['Accelerator']}"])
    except SpinboxdError as e:
        rows.append(["spinboxd", "FAIL", f"not reachable: {e.message}"])
    print(table(["CHECK", "RESULT", "DETAIL"], rows))
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinboxctl", description="Inspect and control spinbox VMs.")
    p.add_argument("--address", help="D-Bus address of the system bus (default: the system bus)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list VMs")
    for name, text in (
        ("status", "show one VM"),
        ("timeline", "show a VM's boot timeline"),
        ("kill", "kill a VM"),
    ):
        sub.add_parser(name, help=text).add_argument("id")
    stop = sub.add_parser("stop", help="stop a VM")
    stop.add_argument("id")
    stop.add_argument("--timeout", type=float, default=10, help="seconds before QEMU is killed")
    logs = sub.add_parser("logs", help="a VM's logs (QEMU, console, vminitd) from the journal")
    logs.add_argument("id")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int)
    check = sub.add_parser("check", help="is this host ready to run spinbox VMs?")
    check.add_argument("--config", type=Path, default=CONFIG_PATH)
    return p


COMMANDS = {
    "list": cmd_list,
    "status": cmd_status,
    "timeline": cmd_timeline,
    "stop": cmd_stop,
    "kill": cmd_kill,
}


async def run(args: argparse.Namespace) -> int:
    if args.command == "check":
        return await cmd_check(args.address, args.config)
    client = await Spinboxd.connect(args.address)
    return await COMMANDS[args.command](client, args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "logs":
        return cmd_logs(args)
    try:
        return asyncio.run(run(args))
    except SpinboxdError as e:
        print(f"spinboxctl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
