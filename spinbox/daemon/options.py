"""CreateVM's arguments, checked once: a VM id and its a{sv} of options."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from dbus_fast import Variant

from spinbox.config import VmConfig
from spinbox.daemon.errors import InvalidArgument
from spinbox.mounts import MountSpec, Volume

# Room for containerd and Kubernetes ids (64 hex digits) and names, while the
# scope name spinbox-vm-<id>.scope stays a plain unit name.
VM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
# containerd's namespace names (its identifiers package: at most 76 characters).
NAMESPACE_RE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
# Kernel parameters that spinbox sets itself and a caller may not override.
RESERVED_KERNEL_ARGS = ("spinbox.", "console=", "init=", "rdinit=")

OPTION_SIGNATURES = {
    "vcpus": "u",
    "memory-mib": "t",
    "rootfs": "a(sssas)",
    "container-id": "s",
    "namespace": "s",
    "netns": "s",
    "kernel-args": "as",
    "annotations": "a{ss}",
    "hotplug-ports": "u",
    "share": "b",
    "volumes": "a(sbb)",
}
# Spare PCIe root ports cost boot time (measured with bench/boot): only VMs
# that get further rootfses later (a pod's) ask for them.
MAX_HOTPLUG_PORTS = 64


@dataclass(frozen=True)
class VmRequest:
    id: str
    vcpus: int
    memory_mib: int
    rootfs: tuple[MountSpec, ...]
    container_id: str
    netns: str | None
    kernel_args: tuple[str, ...]
    annotations: tuple[tuple[str, str], ...]
    hotplug_ports: int = 0
    namespace: str = ""
    # A virtio-fs share (virtiofsd), with the container's volumes bound in it.
    share: bool = False
    volumes: tuple[Volume, ...] = ()


def check_vm_id(vm_id: str) -> str:
    if not VM_ID_RE.fullmatch(vm_id):
        raise InvalidArgument(
            f"VM id {vm_id!r} is not valid: use 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return vm_id


def check_container_id(container_id: str, what: str = "container id") -> str:
    if not VM_ID_RE.fullmatch(container_id):
        raise InvalidArgument(f"{what} {container_id!r} is not a valid container id")
    return container_id


def escape_path_element(text: str) -> str:
    """An object path element for any text, escaped the way systemd does (sd_bus_path_encode)."""
    if not text:
        return "_"
    out = []
    for i, byte in enumerate(text.encode()):
        char = chr(byte)
        if char.isascii() and (char.isalpha() or (char.isdigit() and i > 0)):
            out.append(char)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def _value(options: dict[str, Variant], key: str) -> Any:
    variant = options[key]
    expected = OPTION_SIGNATURES[key]
    if variant.signature != expected:
        raise InvalidArgument(f"option {key!r} must have D-Bus type {expected!r}, not {variant.signature!r}")
    return variant.value


def parse_mounts(value: list[list[Any]], what: str = "option 'rootfs'") -> tuple[MountSpec, ...]:
    mounts = []
    for i, (type_, source, target, mount_options) in enumerate(value):
        if not type_:
            raise InvalidArgument(f"{what}: mount {i} has no type")
        if not source:
            raise InvalidArgument(f"{what}: mount {i} has no source")
        mounts.append(MountSpec(type_, source, target, tuple(mount_options)))
    return tuple(mounts)


def parse_volumes(value: list[list[Any]], what: str = "option 'volumes'") -> tuple[Volume, ...]:
    volumes = tuple(Volume(str(source), bool(ro), bool(rec)) for source, ro, rec in value)
    for index, volume in enumerate(volumes):
        if not os.path.isabs(volume.source):
            raise InvalidArgument(
                f"{what}: the source {volume.source!r} of volume {index} is not an absolute path"
            )
    return volumes


def parse_request(vm_id: str, options: dict[str, Variant], defaults: VmConfig) -> VmRequest:
    """The request, or InvalidArgument naming the first option that is wrong."""
    check_vm_id(vm_id)
    for key in options:
        if key not in OPTION_SIGNATURES:
            known = ", ".join(OPTION_SIGNATURES)
            raise InvalidArgument(f"option {key!r} is not known (known options: {known})")

    vcpus = _value(options, "vcpus") if "vcpus" in options else defaults.vcpus
    if not 1 <= vcpus <= defaults.max_vcpus:
        raise InvalidArgument(f"option 'vcpus' must be between 1 and {defaults.max_vcpus}, not {vcpus}")
    memory = _value(options, "memory-mib") if "memory-mib" in options else defaults.memory_mib
    if not 64 <= memory <= defaults.max_memory_mib:
        raise InvalidArgument(
            f"option 'memory-mib' must be between 64 and {defaults.max_memory_mib}, not {memory}"
        )
    rootfs = parse_mounts(_value(options, "rootfs")) if "rootfs" in options else ()
    container_id = _value(options, "container-id") if "container-id" in options else vm_id
    check_container_id(container_id, "option 'container-id'")
    namespace = _value(options, "namespace") if "namespace" in options else ""
    if namespace and not NAMESPACE_RE.fullmatch(namespace):
        raise InvalidArgument(f"option 'namespace': {namespace!r} is not a valid containerd namespace")

    netns = None
    if "netns" in options:
        netns = _value(options, "netns")
        if not netns.startswith("/"):
            raise InvalidArgument(f"option 'netns' must be an absolute path, not {netns!r}")
        if not os.path.exists(netns):
            raise InvalidArgument(f"option 'netns': {netns} does not exist")

    kernel_args: tuple[str, ...] = ()
    if "kernel-args" in options:
        kernel_args = tuple(_value(options, "kernel-args"))
        for arg in kernel_args:
            if not arg or any(c.isspace() for c in arg):
                raise InvalidArgument(f"option 'kernel-args': {arg!r} is empty or contains white space")
            if arg.startswith(RESERVED_KERNEL_ARGS):
                raise InvalidArgument(f"option 'kernel-args': {arg!r} is set by spinbox itself")

    annotations: tuple[tuple[str, str], ...] = ()
    if "annotations" in options:
        annotations = tuple(sorted(_value(options, "annotations").items()))

    hotplug_ports = _value(options, "hotplug-ports") if "hotplug-ports" in options else 0
    if not 0 <= hotplug_ports <= MAX_HOTPLUG_PORTS:
        raise InvalidArgument(
            f"option 'hotplug-ports' must be between 0 and {MAX_HOTPLUG_PORTS}, not {hotplug_ports}"
        )

    volumes = parse_volumes(_value(options, "volumes")) if "volumes" in options else ()
    share = bool(_value(options, "share")) if "share" in options else False
    if volumes and not share:
        raise InvalidArgument("option 'volumes' needs option 'share'")

    return VmRequest(
        id=vm_id,
        vcpus=vcpus,
        memory_mib=memory,
        rootfs=rootfs,
        container_id=container_id,
        netns=netns,
        kernel_args=kernel_args,
        annotations=annotations,
        hotplug_ports=hotplug_ports,
        namespace=namespace,
        share=share,
        volumes=volumes,
    )
