"""/etc/spinbox/spinbox.toml: defaults, validation, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spinbox.config import Config, ConfigError, VmConfig, load, parse

TOP = Path(__file__).resolve().parents[3]


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load(tmp_path / "absent.toml") == Config()


def test_every_documented_key_is_accepted() -> None:
    config = parse(
        """
        [vm]
        accel = "tcg"
        vcpus = 2
        memory_mib = 1024
        kernel = "/boot/vmlinuz-x"
        initrd = "/srv/initrd.img"
        kernel_args = ["quiet"]
        boot_timeout = 30
        restored_tcg_cache_mib = 64
        [storage]
        upper_size_mib = 512
        tmpfs_upper = true
        [network]
        subnet = "10.99.0.0/16"
        [daemon]
        log_level = "debug"
        """
    )
    assert config.vm.vcpus == 2
    assert config.vm.kernel_args == ("quiet",)
    assert config.vm.boot_timeout == 30.0
    assert config.vm.restored_tcg_cache_mib == 64
    assert config.storage.tmpfs_upper is True
    assert config.network_table == {"subnet": "10.99.0.0/16"}
    assert config.daemon.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[vm]\naccel = "xen"', "vm.accel"),
        ('[vm]\nvcpus = "two"', "vm.vcpus"),
        ("[vm]\nvcpus = 0", "vm.vcpus"),
        ("[vm]\nvcpus = 32", "vm.vcpus"),
        ("[vm]\nmemroy_mib = 5", "vm.memroy_mib"),
        ('[vm]\nkernel = "vmlinuz"', "vm.kernel"),
        ("[vm]\nkernel_args = [1]", "vm.kernel_args"),
        ("[vm]\ntmpfs_upper = true", "vm.tmpfs_upper"),
        ("[vm]\nuid_base = 0", "vm.uid_base"),
        ("[vm]\nuid_base = 2147483000", "vm.uid_base"),
        ('[vm]\nconfine = "no"', "vm.confine"),
        ("[vm]\nrestored_tcg_cache_mib = 0", "vm.restored_tcg_cache_mib must be between 1 and 1024"),
        ("[vm]\nrestored_tcg_cache_mib = 2048", "vm.restored_tcg_cache_mib must be between 1 and 1024"),
        ('[vm]\nrestored_tcg_cache_mib = "64M"', "vm.restored_tcg_cache_mib must be a whole number"),
        (
            "[vm]\nmemory_overhead_mib = 48\nrestored_tcg_cache_mib = 64",
            r"vm.restored_tcg_cache_mib \(64\) must not exceed vm.memory_overhead_mib \(48\)",
        ),
        ("[storage]\ntmpfs_upper = 1", "storage.tmpfs_upper"),
        ("network = 1", "[network]"),
        ('[daemon]\nlog_level = "loud"', "daemon.log_level"),
        ("[qemu]\nx = 1", "[qemu]"),
        ("vm = 1", "[vm]"),
        ("[vm\n", "not valid TOML"),
        ("[timeouts]\ncreate = 0", "timeouts.create"),
        ("[timeouts]\ncreate = 3600", "timeouts.create must not exceed 840"),
        ('[timeouts]\nagent_call = "1m"', "timeouts.agent_call"),
        ("[timeouts]\nqmp = 5", "timeouts.qmp is not a known key"),
    ],
)
def test_bad_values_name_the_key(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse(text)


def test_kernel_defaults_to_the_newest_cloud_kernel(tmp_path: Path) -> None:
    for version in ("6.1.0-9", "6.1.0-10", "5.10.0-30"):
        (tmp_path / f"vmlinuz-{version}-cloud-amd64").touch()
    assert VmConfig().kernel_path(tmp_path) == tmp_path / "vmlinuz-6.1.0-10-cloud-amd64"
    assert VmConfig().kernel_path(tmp_path / "empty") is None
    assert VmConfig(kernel="/srv/vmlinuz").kernel_path(tmp_path) == Path("/srv/vmlinuz")


def test_spinboxd_refuses_a_bad_file_with_a_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "spinbox.toml"
    bad.write_text("[vm]\nmemory_mib = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "spinbox.daemon", "--config", str(bad), "--check-config"],
        cwd=TOP,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 78
    assert "vm.memory_mib must be greater than zero" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_shipped_file_documents_every_default() -> None:
    """packaging/spinbox.toml, every `#key = value` uncommented, is exactly the defaults."""
    from spinbox.net import NetConfig

    shipped = (TOP / "packaging" / "spinbox.toml").read_text()
    uncommented = "\n".join(
        line.removeprefix("#") if " = " in line else line for line in shipped.splitlines()
    )
    config = parse(uncommented)
    assert config.vm == VmConfig()
    assert config.storage == Config().storage
    assert config.daemon == Config().daemon
    assert NetConfig.from_table(config.network_table) == NetConfig()
    documented = {line.split("=")[0].strip("# ") for line in shipped.splitlines() if " = " in line}
    for section in (config.vm, config.storage, config.daemon):
        assert set(vars(section)) <= documented
