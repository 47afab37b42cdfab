"""A pod's network sysctls (the CRI sets some on every sandbox) go to the VM's
network namespace, which the container shares, instead of to crun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guest.vminitd import validate
from guest.vminitd.containers import Containers, RuntimeConfig
from guest.vminitd.spec import prepare_spec


def prepare(tmp_path: Path, sysctl: dict[str, str]) -> tuple[dict[str, Any], Path]:
    proc_sys = tmp_path / "proc-sys"
    (proc_sys / "net" / "ipv4").mkdir(parents=True)
    (proc_sys / "net" / "ipv4" / "ip_unprivileged_port_start").write_text("1024\n")
    config = RuntimeConfig(state_dir=tmp_path / "state", rootfs_dir=tmp_path / "rootfs", proc_sys=proc_sys)
    containers = Containers(config, reaper=None)  # type: ignore[arg-type]
    doc: dict[str, Any] = {
        "process": {"args": ["sleep"]},
        "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}], "sysctl": sysctl},
    }
    prepare_spec(containers.config, "pod", doc, tmp_path / "rootfs" / "pod", terminal=False)
    return doc, proc_sys


def test_network_sysctls_are_set_in_the_vm_and_left_out_of_the_spec(tmp_path: Path) -> None:
    doc, proc_sys = prepare(tmp_path, {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.msgmax": "8192"})
    assert doc["linux"]["sysctl"] == {"kernel.msgmax": "8192"}
    assert doc["linux"]["namespaces"] == []
    assert (proc_sys / "net/ipv4/ip_unprivileged_port_start").read_text() == "0"


def test_a_network_sysctl_that_leaves_proc_sys_is_refused(tmp_path: Path) -> None:
    with pytest.raises(validate.InvalidRequest, match="not a valid network sysctl"):
        prepare(tmp_path, {"net.ipv4/../../x": "1"})
