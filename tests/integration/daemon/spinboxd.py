"""spinbox.service installed into the private systemd, running spinboxd from this source tree."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.harness.systemd import PrivateSystemd

TOP = Path(__file__).resolve().parents[3]
PYTHON = Path(os.environ.get("VENV", TOP / ".venv")) / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)

BUS = "org.spinstack.Spinbox"
MANAGER_PATH = "/org/spinstack/Spinbox"
MANAGER_IFACE = "org.spinstack.Spinbox.Manager"
VM_IFACE = "org.spinstack.Spinbox.VM"

FILES = {
    "units/spinbox.service": "/etc/systemd/system/spinbox.service",
    "units/spinbox.slice": "/etc/systemd/system/spinbox.slice",
    "dbus/org.spinstack.Spinbox.conf": "/usr/share/dbus-1/system.d/org.spinstack.Spinbox.conf",
    "dbus/org.spinstack.Spinbox.service": "/usr/share/dbus-1/system-services/org.spinstack.Spinbox.service",
    "dbus/org.spinstack.spinbox.policy": "/usr/share/polkit-1/actions/org.spinstack.spinbox.policy",
}
DROP_IN = "/etc/systemd/system/spinbox.service.d/source.conf"
CONFIG = "/etc/spinbox/spinbox.toml"


def drop_in() -> str:
    return f"[Service]\nExecStart=\nExecStart={PYTHON} -m spinbox.daemon\nEnvironment=PYTHONPATH={TOP}\n"


@contextlib.contextmanager
def installed(systemd: PrivateSystemd, config: str | None = None) -> Iterator[PrivateSystemd]:
    """spinbox's units and bus files in place (not started); removed again afterwards."""
    for source, inside in FILES.items():
        systemd.install(TOP / source, inside, mode=0o644)
    systemd.write_file(DROP_IN, drop_in())
    if config is not None:
        systemd.write_file(CONFIG, config)
    systemd.run(
        "busctl",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "ReloadConfig",
    )
    systemd.daemon_reload()
    try:
        yield systemd
    finally:
        systemd.systemctl("stop", "spinbox.service", check=False)
        systemd.systemctl("reset-failed", "spinbox.service", check=False)
        for inside in [*FILES.values(), DROP_IN, CONFIG]:
            with contextlib.suppress(FileNotFoundError):
                systemd.path(inside).unlink()
        systemd.run(
            "busctl",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ReloadConfig",
        )
        systemd.daemon_reload()


def busctl(
    systemd: PrivateSystemd, *args: str, check: bool = True, user: int | None = None
) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return systemd.run(*prefix, "busctl", "--no-pager", *args, check=check)


def call_json(systemd: PrivateSystemd, path: str, iface: str, method: str, *sig_and_args: str) -> object:
    result = busctl(systemd, "--json=short", "call", BUS, path, iface, method, *sig_and_args)
    return json.loads(result.stdout)["data"]


def get_property(systemd: PrivateSystemd, path: str, iface: str, name: str) -> object:
    result = busctl(systemd, "--json=short", "get-property", BUS, path, iface, name)
    return json.loads(result.stdout)["data"]


def leftovers(systemd: PrivateSystemd) -> dict[str, object]:
    """What VMs may leave behind: scopes, QEMU processes, runtime files, sockets."""
    units = systemd.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "spinbox-vm-*").stdout
    vm_dir = systemd.path("/run/spinbox/vm")
    files = sorted(str(p) for p in vm_dir.rglob("*")) if vm_dir.exists() else []
    return {
        "scopes": [line.split()[0] for line in units.splitlines() if line.strip()],
        "qemu": systemd.processes("qemu-system"),
        "files": files,
        "netns": sorted(p.name for p in systemd.path("/run/netns").glob("spinbox-*")),
    }
