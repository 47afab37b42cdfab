"""spinboxctl check: is this host ready to run spinbox VMs? One row per thing looked at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from spinbox import cniplugins
from spinbox.config import CONFIG_PATH, Config
from spinbox.host import KvmHost, find_virtiofsd

Row = list[str]


def _row(rows: list[Row], name: str, ok: bool, detail: str, warn: bool = False) -> None:
    rows.append([name, "ok" if ok else ("warn" if warn else "FAIL"), detail])


def host_rows(config: Config, config_error: str | None) -> list[Row]:
    rows: list[Row] = []
    _row(rows, "config", config_error is None, config_error or f"{CONFIG_PATH} (or defaults)")
    usable, reason = KvmHost().usable()
    _row(rows, "kvm", usable, reason or "/dev/kvm is usable", warn=True)
    wanted = config.vm.accel
    if wanted == "kvm" and not usable:
        _row(rows, "accelerator", False, 'vm.accel is "kvm" but KVM is not usable')
    elif wanted == "tcg" or not usable:
        _row(rows, "accelerator", True, "tcg: VMs run under emulation (much slower than KVM)")
    else:
        _row(rows, "accelerator", True, "kvm")
    qemu = shutil.which("qemu-system-x86_64")
    _row(rows, "qemu", qemu is not None, qemu or "qemu-system-x86_64 not found (apt install qemu-system-x86)")
    virtiofsd = find_virtiofsd()
    _row(
        rows,
        "virtiofsd",
        virtiofsd is not None,
        f"{virtiofsd} (bind mounts of host directories and files)"
        if virtiofsd
        else "not found: bind mounts cannot be shared (apt install qemu-system-common, or virtiofsd)",
        warn=True,
    )
    rows.append(user_namespaces_row())
    kernel = config.vm.kernel_path()
    _row(
        rows,
        "guest kernel",
        kernel is not None and kernel.exists(),
        str(kernel) if kernel else "no /boot/vmlinuz-*-cloud-amd64 (apt install linux-image-cloud-amd64)",
    )
    initrd = config.vm.initrd_path
    _row(
        rows,
        "guest image",
        initrd.exists(),
        str(initrd) if initrd.exists() else f"{initrd} missing: run spinbox-mkguest",
    )
    rows += cni_rows(config)
    containerd = shutil.which("containerd")
    missing = "containerd not found (apt install containerd)"
    _row(rows, "containerd", containerd is not None, containerd or missing)
    shim = shutil.which("containerd-shim-spinbox-v1")
    _row(rows, "shim", shim is not None, shim or "containerd-shim-spinbox-v1 not on PATH", warn=True)
    _row(rows, "tun", Path("/dev/net/tun").exists(), "/dev/net/tun")
    return rows


def user_namespaces_row(limit: Path = Path("/proc/sys/user/max_user_namespaces")) -> Row:
    """A confined VM's virtiofsd runs in a user namespace of its own (doc/security.md)."""
    rows: list[Row] = []
    try:
        count = int(limit.read_text())
    except (OSError, ValueError):
        count = -1
    if count > 0:
        _row(rows, "user namespaces", True, f"{limit}: {count} (virtiofsd's confinement)")
    else:
        found = "unreadable" if count < 0 else "0"
        _row(
            rows,
            "user namespaces",
            False,
            f"{limit} is {found}: a VM with volumes cannot start its confined virtiofsd "
            "(sysctl user.max_user_namespaces)",
            warn=True,
        )
    return rows[0]


def cni_rows(config: Config) -> list[Row]:
    """A row per CNI plugin spinbox's network list needs ("cni/bridge", "cni/host-local", ...)."""
    rows: list[Row] = []
    table = {key.replace("-", "_"): value for key, value in config.network_table.items()}
    if table.get("enabled", True) in (False, "off"):
        _row(rows, "cni", True, "networking is off ([network] enabled)")
        return rows
    plugin_path = table.get("plugin_path", [str(d) for d in cniplugins.DEFAULT_PLUGIN_PATH])
    dirs = [Path(d) for d in ([plugin_path] if isinstance(plugin_path, str) else plugin_path)]
    source = Path(str(table.get("conflist", cniplugins.DEFAULT_CONFLIST)))
    try:
        conflist = cniplugins.find_conflist(source)
        types = cniplugins.plugin_types(json.loads(conflist.read_text())["plugins"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        _row(rows, "cni", False, f"cannot read the network list {source}: {error}")
        return rows
    for kind in dict.fromkeys(types):
        found = next((d / kind for d in dirs if (d / kind).is_file()), None)
        where = ", ".join(map(str, dirs))
        missing = f"not in {where} (apt install containernetworking-plugins)"
        _row(rows, f"cni/{kind}", found is not None, str(found) if found else missing)
    return rows
