"""What spinboxd needs from a VM, storage and network implementation.

The daemon's lifecycle code speaks to these protocols; `spinbox.daemon.qemu`
implements them with spinbox.vm, spinbox.storage and spinbox.net.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spinbox.config import Config
from spinbox.daemon.options import VmRequest
from spinbox.mounts import MountSpec

Spawn = Callable[[list[str], Sequence[int]], Awaitable[Any]]


@dataclass(frozen=True)
class Launch:
    """What a VM's QEMU is started with."""

    request: VmRequest
    runtime_dir: Path
    disks: Sequence[Any]  # spinbox.vm.Disk
    nics: Sequence[Any]  # spinbox.vm.Nic
    spawn: Spawn
    # Restore from this template (spinbox.daemon.templates.Template) instead of booting.
    template: Any = None
    # QEMU's end of the connection to the VM's virtiofsd (never with a template).
    virtiofs_fd: int | None = None


class Machine(Protocol):
    """A running QEMU (spinbox.vm.VirtualMachine)."""

    @property
    def pid(self) -> int: ...
    @property
    def agent_address(self) -> str: ...
    @property
    def control_address(self) -> str: ...
    @property
    def console_socket(self) -> Path | None: ...
    @property
    def log_socket(self) -> Path | None: ...
    @property
    def timeline(self) -> Mapping[str, float]: ...
    @property
    def ending(self) -> Any: ...  # spinbox.vm.ending.Ending once QEMU has ended, else None

    async def wait_ready(self, timeout: float) -> Any: ...  # noqa: ASYNC109
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def shutdown(self, timeout: float) -> Any: ...  # noqa: ASYNC109
    async def kill(self) -> Any: ...
    async def wait_exit(self) -> Any: ...
    async def detach(self) -> None: ...
    async def add_disk(self, disk: Any) -> None: ...
    async def remove_disk(self, serial: str) -> None: ...
    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


class Rootfs(Protocol):
    """A prepared rootfs (spinbox.storage): block images plus the guest's mount request."""

    @property
    def writable(self) -> bool:
        """Whether the guest's writes go back into a snapshot."""
        ...

    @property
    def upper_image(self) -> Path | None:
        """The writable layer's disk image (the guest's writes until they are written back)."""
        ...

    async def writeback(self, stream: AsyncIterable[bytes]) -> None: ...
    async def release(self) -> None: ...


@dataclass(frozen=True)
class GuestSetup:
    """What the guest agent is asked to do once it answers."""

    network: Any | None  # agent_pb2.NetworkConfig
    mount: Any | None  # agent_pb2.MountRootfsRequest


class Network(Protocol):
    """A VM's network (spinbox.net.VmNetwork): TAP fds for QEMU, the guest's NetworkConfig."""

    @property
    def guest(self) -> Any: ...

    def close(self) -> None:
        """Close spinboxd's copies of the TAP fds (QEMU holds its own)."""
        ...


class Backend(Protocol):
    async def prepare_rootfs(self, request: VmRequest, work_dir: Path) -> tuple[Rootfs, Sequence[Any], Any]:
        """The prepared rootfs, its disks (spinbox.vm.Disk) and its MountRootfsRequest."""
        ...

    async def prepare_added_rootfs(
        self, container_id: str, mounts: Sequence[MountSpec], work_dir: Path, serial_prefix: str
    ) -> tuple[Rootfs, Sequence[Any], Any]:
        """The same for a further container of a running VM, its disks' serials starting with the prefix."""
        ...

    def restore_rootfs(self, work_dir: Path, container_id: str) -> Rootfs | None:
        """The rootfs prepared in `work_dir` by an earlier spinboxd, if any."""
        ...

    async def prepare_netns(self, vm_id: str) -> tuple[str, int]: ...

    async def setup_network(self, request: VmRequest) -> tuple[Network, Sequence[Any]]:
        """The network and its NICs (spinbox.vm.Nic)."""
        ...

    async def teardown_network(self, vm_id: str) -> None: ...
    async def open_port_forward(self, vm_id: str) -> socket.socket:
        """A listener on 127.0.0.1 in the VM's network namespace and the rule redirecting to it."""
        ...

    async def collect_network_leftovers(self, live_vm_ids: Sequence[str]) -> None: ...
    async def collect_storage_leftovers(self) -> None:
        """Layer cache entries nothing references any more and what a crash left in it."""
        ...

    async def launch(self, launch: Launch) -> Machine:
        """QEMU for the VM: booted, or restored from `launch.template` with its agent answering."""
        ...

    def template_identity(self, shape: Any, ports: int) -> dict[str, Any]:
        """What a VM restored from a template must share with it: files, QEMU, its command line."""
        ...

    async def build_template(
        self, shape: Any, ports: int, directory: Path, runtime_dir: Path, spawn: Spawn
    ) -> None:
        """Boot a template of `shape` (spinbox.daemon.templates.Shape) and save it into `directory`."""
        ...

    async def attach(self, runtime_dir: Path) -> Machine: ...

    async def configure_guest(self, machine: Machine, setup: GuestSetup) -> str:
        """Configure the network and mount the rootfs in the guest; the rootfs path ("" without)."""
        ...

    async def mount_rootfs(self, machine: Machine, mount: Any) -> str:
        """Have the guest mount a rootfs (agent_pb2.MountRootfsRequest); its guest path."""
        ...

    async def quiesce_guest(self, machine: Machine, container_id: str, unmount: bool) -> None:
        """Have the guest sync (and unmount) its writable layer."""
        ...

    async def export_upper(
        self, machine: Machine, container_id: str, rootfs: Rootfs, final: bool = False
    ) -> None:
        """Have the running guest stream a container's writable layer into its snapshot;
        `final` (the VM's stop): the guest ends the container first, so nothing writes after."""
        ...

    async def rescue_upper(
        self, vm_id: str, rootfs: Rootfs, runtime_dir: Path, spawn: Spawn, launched: Callable[[Machine], None]
    ) -> None:
        """Write back the writable layer of a VM whose QEMU ended: a helper VM (a fresh guest,
        as confined as any VM) reads the layer's disk and streams it like a running guest;
        `launched` is called with its QEMU once started."""
        ...

    def accelerator(self) -> str: ...

    async def resize(self, machine: Machine, vcpus: int, memory_mib: int) -> dict[str, int]:
        """Give the running VM this size (vCPUs plugged are brought online in the guest);
        returns what the VM and its guest have then ("vcpus", "memory-mib", "guest-cpus",
        "guest-mem-total-kib"), once the guest's kernel counts it: GuestUnsettled (with the
        machine's new size) if it does not in time."""
        ...

    async def size_range(self, machine: Machine) -> tuple[tuple[int, int], tuple[int, int]]:
        """The VM's boot and maximum (vcpus, memory_mib)."""
        ...


BackendFactory = Callable[[Config], Backend]
