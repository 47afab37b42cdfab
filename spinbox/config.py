"""spinbox's configuration: /etc/spinbox/spinbox.toml, parsed and validated once.

The file is optional and every key has a built-in default, documented below
and in `DEFAULT_CONFIG_TEXT`. Unknown keys and values of the wrong type are
errors that name the key, so a typo never silently means "default".

    [vm]
    accel = "auto"            # "auto" (KVM when usable, else TCG), "kvm" or "tcg"
    vcpus = 1                 # vCPUs of a VM whose request names none
    memory_mib = 512          # guest RAM of a VM whose request names none
    max_vcpus = 16            # the most a request may ask for
    max_memory_mib = 65536
    kernel = ""               # "" = the newest /boot/vmlinuz-*-cloud-amd64
    initrd = "/var/lib/spinbox/guest/initrd.img"
    kernel_args = []          # appended to every VM's kernel command line
    memory_overhead_mib = 256 # added to guest RAM for the scope's MemoryMax (QEMU itself)
    hotplug_memory_mib = 4096 # memory a running VM may be given beyond its boot size (resize)
    boot_timeout = 120        # seconds until the guest agent must answer
    stop_timeout = 30         # seconds a Stop waits for an orderly shutdown
    boot = "cold"             # "template": restore VMs from a saved, booted guest; "cold": boot each
    uid_base = 2097152000     # VMs' QEMUs run as uids uid_base .. uid_base+65535, one per VM
    confine = true            # false: QEMU as root without -sandbox (to measure confinement's cost only)
    restored_tcg_cache_mib = 32 # TCG's translation cache of a VM restored from a template (kept while idle)
    template_disk_slots = 2   # disks a template holds from its boot, for restored VMs' first disks
    template_nic_slots = 1    # NICs a template holds from its boot, for restored VMs' first NICs

    [storage]
    layer_cache = "/var/lib/spinbox/layers"
    upper_size_mib = 10240    # size of a VM's writable layer image
    tmpfs_upper = false       # keep the writable layer in guest RAM instead

    [network]                 # read by spinbox.net (NetConfig.from_table)
    enabled = true            # false or "off": VMs get no NIC
    conflist = <spinbox's own> # CNI network for VMs without a netns
    plugin_path = ["/usr/lib/cni", "/opt/cni/bin"]
    subnet = ""               # replaces the conflist's host-local subnet when set
    run_dir = "/run/spinbox"

    [daemon]
    log_level = "info"        # debug, info, warning, error

    [timeouts]                # seconds; each names the step and the VM when it fires
    create = 300              # a whole CreateVM: storage, network, boot, guest setup
    systemd_job = 30          # each systemd call and job (a VM scope started or stopped)
    agent_call = 60           # each call spinboxd makes to a guest's agent (5x for sync/unmount)
    virtiofsd_start = 30      # a VM's virtiofsd until its socket is ready
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.host import newest_cloud_kernel

CONFIG_PATH = Path("/etc/spinbox/spinbox.toml")
DEFAULT_INITRD = Path("/var/lib/spinbox/guest/initrd.img")
ACCELS = ("auto", "kvm", "tcg")
BOOTS = ("template", "cold")
LOG_LEVELS = ("debug", "info", "warning", "error")
# QEMU's own default translation cache under TCG on 64-bit hosts.
TCG_CACHE_MAX_MIB = 1024
# Device slots of a template, of each kind (a template has 24 spare PCIe ports in all).
MAX_SLOTS = 8
# The shim waits 900 s for CreateVM (spinbox.shim.spinboxd.CREATE_TIMEOUT).
CREATE_TIMEOUT_MAX = 840.0


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class VmConfig:
    accel: str = "auto"
    vcpus: int = 1
    memory_mib: int = 512
    max_vcpus: int = 16
    max_memory_mib: int = 65536
    kernel: str = ""
    initrd: str = str(DEFAULT_INITRD)
    kernel_args: tuple[str, ...] = ()
    memory_overhead_mib: int = 256
    hotplug_memory_mib: int = 4096
    boot_timeout: float = 120.0
    stop_timeout: float = 30.0
    boot: str = "cold"
    uid_base: int = 0x7D000000
    confine: bool = True
    # spinbox.vm.qemu.TCG_TB_SIZE_RESTORED_MIB says what was measured for the default.
    restored_tcg_cache_mib: int = 32
    # Devices a template boots with (spinbox.vm.template); a restored VM's further ones are hot-plugged.
    template_disk_slots: int = 2
    template_nic_slots: int = 1

    def kernel_path(self, boot: Path = Path("/boot")) -> Path | None:
        """The configured kernel, or the newest Debian cloud kernel under /boot (None: none)."""
        if self.kernel:
            return Path(self.kernel)
        return newest_cloud_kernel(boot)

    @property
    def initrd_path(self) -> Path:
        return Path(self.initrd)


@dataclass(frozen=True)
class StorageConfig:
    layer_cache: str = "/var/lib/spinbox/layers"
    upper_size_mib: int = 10240
    tmpfs_upper: bool = False


@dataclass(frozen=True)
class DaemonConfig:
    log_level: str = "info"


@dataclass(frozen=True)
class TimeoutsConfig:
    create: float = 300.0
    systemd_job: float = 30.0
    agent_call: float = 60.0
    virtiofsd_start: float = 30.0


@dataclass(frozen=True)
class Config:
    vm: VmConfig = field(default_factory=VmConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    # [network] as written; spinbox.net validates it (NetConfig.from_table).
    network: tuple[tuple[str, Any], ...] = ()
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)

    @property
    def network_table(self) -> dict[str, Any]:
        return dict(self.network)


_SECTIONS: dict[str, type[Any]] = {
    "vm": VmConfig,
    "storage": StorageConfig,
    "daemon": DaemonConfig,
    "timeouts": TimeoutsConfig,
}


def _convert(key: str, value: Any, default: Any) -> Any:
    """`value` from TOML as the type of `default`, or ConfigError naming `key`."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, not {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, not {value!r}")
        return tuple(value)
    raise AssertionError(f"no conversion for {key}")


def _section(name: str, cls: type[Any], table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    defaults = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{name}.{key} is not a known key (known keys of [{name}]: {known})")
        values[key] = _convert(f"{name}.{key}", value, getattr(defaults, key))
    return cls(**values)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be greater than zero, not {value}")


def validate(config: Config) -> None:
    vm = config.vm
    if vm.accel not in ACCELS:
        raise ConfigError(f"vm.accel must be one of {', '.join(ACCELS)}, not {vm.accel!r}")
    if vm.boot not in BOOTS:
        raise ConfigError(f"vm.boot must be one of {', '.join(BOOTS)}, not {vm.boot!r}")
    for key in ("vcpus", "memory_mib", "max_vcpus", "max_memory_mib", "boot_timeout", "stop_timeout"):
        _positive(f"vm.{key}", getattr(vm, key))
    if vm.hotplug_memory_mib < 0:
        raise ConfigError(f"vm.hotplug_memory_mib must not be negative, not {vm.hotplug_memory_mib}")
    if vm.memory_overhead_mib < 0:
        raise ConfigError(f"vm.memory_overhead_mib must not be negative, not {vm.memory_overhead_mib}")
    if not 1000 <= vm.uid_base <= 2**31 - 65536:
        raise ConfigError(f"vm.uid_base must be between 1000 and {2**31 - 65536}, not {vm.uid_base}")
    if not 1 <= vm.restored_tcg_cache_mib <= TCG_CACHE_MAX_MIB:
        raise ConfigError(
            f"vm.restored_tcg_cache_mib must be between 1 and {TCG_CACHE_MAX_MIB}, "
            f"not {vm.restored_tcg_cache_mib}"
        )
    if vm.restored_tcg_cache_mib > vm.memory_overhead_mib:
        raise ConfigError(
            f"vm.restored_tcg_cache_mib ({vm.restored_tcg_cache_mib}) must not exceed "
            f"vm.memory_overhead_mib ({vm.memory_overhead_mib}): the cache is QEMU's memory, "
            "which the VM's scope allows beside the guest's"
        )
    for key in ("template_disk_slots", "template_nic_slots"):
        if not 0 <= getattr(vm, key) <= MAX_SLOTS:
            raise ConfigError(f"vm.{key} must be between 0 and {MAX_SLOTS}, not {getattr(vm, key)}")
    if vm.vcpus > vm.max_vcpus:
        raise ConfigError(f"vm.vcpus ({vm.vcpus}) must not exceed vm.max_vcpus ({vm.max_vcpus})")
    if vm.memory_mib > vm.max_memory_mib:
        raise ConfigError(
            f"vm.memory_mib ({vm.memory_mib}) must not exceed vm.max_memory_mib ({vm.max_memory_mib})"
        )
    for key in ("kernel", "initrd"):
        value = getattr(vm, key)
        if value and not value.startswith("/"):
            raise ConfigError(f"vm.{key} must be an absolute path, not {value!r}")
    if not config.storage.layer_cache.startswith("/"):
        raise ConfigError(f"storage.layer_cache must be an absolute path, not {config.storage.layer_cache!r}")
    _positive("storage.upper_size_mib", config.storage.upper_size_mib)
    for key in ("create", "systemd_job", "agent_call", "virtiofsd_start"):
        _positive(f"timeouts.{key}", getattr(config.timeouts, key))
    if config.timeouts.create > CREATE_TIMEOUT_MAX:
        raise ConfigError(
            f"timeouts.create must not exceed {CREATE_TIMEOUT_MAX:g} (the shim's own deadline), "
            f"not {config.timeouts.create:g}"
        )
    if config.daemon.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"daemon.log_level must be one of {', '.join(LOG_LEVELS)}, not {config.daemon.log_level!r}"
        )


def parse(text: str, origin: str = str(CONFIG_PATH)) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin} is not valid TOML: {e}") from None
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name == "network":
            if not isinstance(table, dict):
                raise ConfigError("[network] must be a table")
            sections[name] = tuple(sorted(table.items()))
            continue
        if name not in _SECTIONS:
            known = ", ".join(sorted([*_SECTIONS, "network"]))
            raise ConfigError(f"[{name}] is not a known section (known sections: {known})")
        sections[name] = _section(name, _SECTIONS[name], table)
    config = Config(**sections)
    validate(config)
    return config


def load(path: Path = CONFIG_PATH) -> Config:
    """The configuration in `path`, or the defaults when there is no such file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        return parse(text, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
