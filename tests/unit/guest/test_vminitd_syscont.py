"""System containers: what vminitd changes in the spec of a privileged or systemd
container, and the stop signal systemd gets."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from guest.vminitd import syscont

ALL_CAPS = ["CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_NET_ADMIN"]
RO_CGROUP = {
    "destination": "/sys/fs/cgroup",
    "type": "cgroup",
    "source": "cgroup",
    "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
}


def rootfs_with_systemd(tmp_path: Path) -> Path:
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/lib/systemd").mkdir(parents=True)
    (rootfs / "usr/sbin").mkdir(parents=True)
    (rootfs / "usr/bin").mkdir(parents=True)
    systemd = rootfs / "usr/lib/systemd/systemd"
    systemd.write_text("")
    systemd.chmod(0o755)
    (rootfs / "sbin").symlink_to("usr/sbin")
    (rootfs / "usr/sbin/init").symlink_to("../lib/systemd/systemd")
    sh = rootfs / "usr/bin/sh"
    sh.write_text("")
    sh.chmod(0o755)
    return rootfs


def spec(args: list[str], caps: list[str]) -> dict[str, Any]:
    return {
        "process": {"args": args, "env": ["PATH=/usr/bin:/usr/sbin"], "capabilities": {"bounding": caps}},
        "mounts": [dict(RO_CGROUP, options=list(RO_CGROUP["options"]))],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }


def test_systemd_as_init_gets_tmpfs_a_delegated_cgroup_and_container_env(tmp_path: Path) -> None:
    doc = spec(["/sbin/init"], ALL_CAPS)
    modules = tmp_path / "modules"
    (modules / "6.1.0-test").mkdir(parents=True)
    assert syscont.prepare("c1", doc, rootfs_with_systemd(tmp_path), "6.1.0-test", modules)
    assert {"type": "cgroup"} in doc["linux"]["namespaces"]
    (cgroup,) = [m for m in doc["mounts"] if m["destination"] == "/sys/fs/cgroup"]
    assert "rw" in cgroup["options"] and "ro" not in cgroup["options"]
    tmpfs = {m["destination"] for m in doc["mounts"] if m["type"] == "tmpfs"}
    assert tmpfs == {"/run", "/run/lock", "/tmp"}
    assert "container=spinbox" in doc["process"]["env"]
    (bind,) = [m for m in doc["mounts"] if m["type"] == "bind"]
    assert bind == {
        "destination": "/lib/modules/6.1.0-test",
        "type": "bind",
        "source": str(modules / "6.1.0-test"),
        "options": ["rbind", "ro", "nosuid", "nodev"],
    }


def test_an_ordinary_container_is_left_alone(tmp_path: Path) -> None:
    doc = spec(["sh"], ["CAP_CHOWN", "CAP_KILL"])
    before = repr(doc)
    assert not syscont.prepare("c1", doc, rootfs_with_systemd(tmp_path), "6.1.0-test", tmp_path)
    assert repr(doc) == before


def test_a_privileged_shell_gets_its_cgroup_but_no_systemd_mounts(tmp_path: Path) -> None:
    doc = spec(["sh"], ALL_CAPS)
    assert not syscont.prepare("c1", doc, rootfs_with_systemd(tmp_path), "6.1.0-none", tmp_path)
    assert {"type": "cgroup"} in doc["linux"]["namespaces"]
    assert [m["destination"] for m in doc["mounts"]] == ["/sys/fs/cgroup"]  # no modules dir: no bind
    assert doc["process"]["env"] == ["PATH=/usr/bin:/usr/sbin"]


def test_the_specs_own_mounts_win(tmp_path: Path) -> None:
    doc = spec(["/lib/systemd/systemd"], [])
    (tmp_path / "rootfs/lib/systemd").mkdir(parents=True)
    (tmp_path / "rootfs/lib/systemd/systemd").write_text("")
    (tmp_path / "rootfs/lib/systemd/systemd").chmod(0o755)
    doc["mounts"].append({"destination": "/tmp/", "type": "bind", "source": "/x", "options": ["rbind"]})
    doc["process"]["env"].append("container=docker")
    assert syscont.prepare("c1", doc, tmp_path / "rootfs", "k", tmp_path)
    assert [m["destination"] for m in doc["mounts"] if m["type"] == "tmpfs"] == ["/run", "/run/lock"]
    assert "container=spinbox" not in doc["process"]["env"]


def test_systemd_gets_sigrtmin_3_for_sigterm() -> None:
    assert syscont.stop_signal(signal.SIGTERM, systemd=True) == signal.SIGRTMIN + 3 == 37
    assert syscont.stop_signal(signal.SIGKILL, systemd=True) == signal.SIGKILL
    assert syscont.stop_signal(signal.SIGTERM, systemd=False) == signal.SIGTERM


def wait_status(code: int = 0, signalled: int = 0) -> int:
    return signalled if signalled else code << 8


def test_systemds_halt_through_reboot_is_a_clean_exit() -> None:
    # reboot(2) in a PID namespace ends its init with SIGINT (halt, poweroff) or SIGHUP (reboot).
    halted = wait_status(signalled=signal.SIGINT)
    assert syscont.init_exit_code(halted, systemd=True) == 0
    assert syscont.init_exit_code(halted, systemd=False) == 130
    assert syscont.init_exit_code(wait_status(signalled=signal.SIGKILL), systemd=True) == 137
    assert syscont.init_exit_code(wait_status(signalled=signal.SIGHUP), systemd=True) == 129
    assert syscont.init_exit_code(wait_status(code=3), systemd=True) == 3
