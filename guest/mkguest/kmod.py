"""Kernel modules for the guest, resolved through the kernel's modules.dep."""

from __future__ import annotations

import lzma
import subprocess
from dataclasses import dataclass
from pathlib import Path

from guest.mkguest.errors import BuildError

KERNEL_PACKAGE = "linux-image-cloud-amd64"

# What the guest needs: virtio transports and devices, vsock, and the file
# systems of container layers. Built-in ones are skipped.
REQUIRED_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "erofs",
    "overlay",
)
# What the agent's virtio-serial channel needs (on either transport): vminitd loads these (and their
# dependencies) before it serves, and the others while it serves.
AGENT_MODULES = ("virtio_pci", "virtio_mmio", "virtio_console")
# virtio_balloon: free page reporting hands the pages the guest frees back to the host.
# virtiofs (with fuse): the host's directories and files for bind mounts.
# virtio_mem: memory plugged into and unplugged from the running VM (ctr task update).
OPTIONAL_MODULES = (
    "vsock", "vmw_vsock_virtio_transport", "loop", "ext4", "pvpanic_pci", "virtio_balloon", "virtiofs",
    "virtio_mem",
)  # fmt: skip
# What containers inside a container need (Docker, systemd-nspawn, CNI plugins, critest's
# `brctl addbr`): in the image but not loaded at boot. The guest kernel loads them when
# they are first used (request_module runs the image's /sbin/modprobe), and a privileged
# container's own modprobe finds them in the guest's /lib/modules.
ON_DEMAND_MODULES = (
    "bridge",
    "br_netfilter",
    "veth",
    "tun",
    "macvlan",
    "ipvlan",
    "vxlan",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_masq",
    "nft_nat",
    "nft_ct",
    "nft_reject_inet",
    "nft_fib_inet",
    "nf_conntrack_netlink",
    "ip_tables",
    "ip6_tables",
    "iptable_nat",
    "iptable_filter",
    "iptable_mangle",
    "ip6table_nat",
    "ip6table_filter",
    "ipt_REJECT",
    "xt_MASQUERADE",
    "xt_conntrack",
    "xt_addrtype",
    "xt_nat",
    "xt_tcpudp",
    "xt_comment",
    "xt_mark",
    "xt_multiport",
)
# The config symbol that builds each required module into a kernel without modules.
BUILTIN_SYMBOLS = {
    "virtio_pci": "CONFIG_VIRTIO_PCI",
    "virtio_mmio": "CONFIG_VIRTIO_MMIO",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_net": "CONFIG_VIRTIO_NET",
    "virtio_console": "CONFIG_VIRTIO_CONSOLE",
    "virtio_rng": "CONFIG_HW_RANDOM_VIRTIO",
    "erofs": "CONFIG_EROFS_FS",
    "overlay": "CONFIG_OVERLAY_FS",
}


def _canonical(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: str) -> str:
    return _canonical(Path(path).name.split(".ko")[0])


@dataclass(frozen=True)
class KernelModule:
    path: str  # relative to /lib/modules/<kver>, with the compression suffix dropped
    data: bytes
    early: bool = True  # loaded before the agent serves
    at_boot: bool = True  # False: loaded on demand only (ON_DEMAND_MODULES)


@dataclass(frozen=True)
class ModuleTree:
    """/lib/modules/<kver> of an installed kernel."""

    root: Path

    @property
    def version(self) -> str:
        return self.root.name

    def _read(self, name: str) -> list[str]:
        path = self.root / name
        try:
            return path.read_text().splitlines()
        except FileNotFoundError:
            raise BuildError(
                f"{path} does not exist: install the kernel's package (apt install {KERNEL_PACKAGE}) "
                f"or run `depmod {self.version}`"
            ) from None

    def resolve(
        self,
        required: tuple[str, ...] = REQUIRED_MODULES,
        optional: tuple[str, ...] = OPTIONAL_MODULES,
    ) -> list[str]:
        """The module files (relative paths) to load, dependencies first."""
        deps: dict[str, list[str]] = {}
        by_name: dict[str, str] = {}
        for line in self._read("modules.dep"):
            module, _, rest = line.partition(":")
            deps[module] = rest.split()
            by_name[_module_name(module)] = module
        builtin = {_module_name(line) for line in self._read("modules.builtin") if line}
        order: list[str] = []

        def visit(module: str) -> None:
            if module in order:
                return
            for dep in deps.get(module, []):
                visit(dep)
            order.append(module)

        for name in (*required, *optional):
            canonical = _canonical(name)
            if canonical in by_name:
                visit(by_name[canonical])
            elif canonical not in builtin and name in required:
                raise BuildError(
                    f"kernel {self.version} has no module {name} (neither built in nor in modules.dep): "
                    "the guest needs it"
                )
        return order

    def load(self, relative: str, early: bool = True, at_boot: bool = True) -> KernelModule:
        path = self.root / relative
        data = path.read_bytes()
        if relative.endswith(".xz"):
            data = lzma.decompress(data)
        elif relative.endswith(".zst"):
            data = subprocess.run(["zstd", "-dcq", str(path)], check=True, capture_output=True).stdout
        elif not relative.endswith(".ko"):
            raise BuildError(f"kernel module {path} has a compression spinbox-mkguest does not know")
        return KernelModule(relative[: relative.index(".ko") + 3], data, early, at_boot)


def module_free(kernel: Path) -> bool:
    """Whether `kernel` was built without module support, by the config-<name> beside vmlinuz-<name>.

    Such a kernel (kernel/build makes one) needs nothing from /lib/modules, but must
    have every required module built in; BuildError names those it lacks.
    """
    _, dash, name = kernel.name.partition("-")
    config = kernel.with_name(f"config-{name}")
    if not dash or not config.is_file():
        return False
    lines = config.read_text().splitlines()
    if "# CONFIG_MODULES is not set" not in lines:
        return False
    missing = [module for module, symbol in BUILTIN_SYMBOLS.items() if f"{symbol}=y" not in lines]
    if missing:
        raise BuildError(
            f"kernel {kernel} has no module support and does not build in {', '.join(missing)} "
            f"(see {config}): the guest needs them"
        )
    return True


# The files of /lib/modules/<kver> that modprobe (busybox's in the guest, kmod's in a
# container) reads; depmod writes them for exactly the modules the image carries.
INDEX_FILES = (
    "modules.alias",
    "modules.alias.bin",
    "modules.builtin",
    "modules.builtin.alias.bin",
    "modules.builtin.bin",
    "modules.builtin.modinfo",
    "modules.dep",
    "modules.dep.bin",
    "modules.devname",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
)


def module_indexes(tree: ModuleTree, modules: list[KernelModule], scratch: Path) -> dict[str, bytes]:
    """modules.dep and the other indexes of `modules` alone, by depmod in `scratch`."""
    base = scratch / "lib" / "modules" / tree.version
    for ko in modules:
        path = base / ko.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(ko.data)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (tree.root / name).is_file():
            (base / name).write_bytes((tree.root / name).read_bytes())
    try:
        subprocess.run(
            ["depmod", "--basedir", str(scratch), tree.version], check=True, capture_output=True, text=True
        )
    except FileNotFoundError:
        raise BuildError("depmod is not installed: apt install kmod") from None
    except subprocess.CalledProcessError as e:
        raise BuildError(f"depmod failed for the guest's modules: {e.stderr.strip()}") from None
    return {name: (base / name).read_bytes() for name in INDEX_FILES if (base / name).is_file()}
