"""A container's init exit: when the container shares its pod's PID namespace, the processes
its init leaves are SIGKILLed (its cgroup's cgroup.kill) before the exit is reported, as the end
of a PID namespace of its own would kill them; a container that owns its namespace needs nothing."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest

from guest.vminitd.config import RuntimeConfig
from guest.vminitd.containers import Container, Containers, Process, owns_pid_namespace
from guest.vminitd.reaper import Reaper
from spinbox.api.proto import agent_pb2 as pb


def test_which_specs_own_their_pid_namespace() -> None:
    assert owns_pid_namespace({"linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]}})
    assert not owns_pid_namespace({"linux": {"namespaces": [{"type": "pid", "path": "/proc/57/ns/pid"}]}})
    assert not owns_pid_namespace({"linux": {"namespaces": [{"type": "mount"}]}})  # the VM's own
    assert not owns_pid_namespace({})


def exit_of(tmp_path: Path, own: bool, procs: str, kill_file: bool = True) -> tuple[Path, list[bool]]:
    """Runs the exit of a container's init; returns its cgroup and whether the exit was
    already reported when cgroup.kill was written."""
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "cgroup.procs").write_text(procs)
    if kill_file:
        (cgroup / "cgroup.kill").write_text("")
    else:
        (cgroup / "cgroup.kill").mkdir()  # writing it fails, as on a kernel without cgroup.kill
    config = RuntimeConfig(state_dir=tmp_path / "state", rootfs_dir=tmp_path / "rootfs")
    init = Process("app", "", pb.IoConfig(), pid=41)
    container = Container(
        "app", tmp_path / "bundle", tmp_path / "rootfs", init, cgroup, own_pid_namespace=own
    )
    reported: list[bool] = []

    async def main() -> None:
        containers = Containers(config, Reaper())
        original = init.exited.set

        def set_exited() -> None:
            reported.append(
                (cgroup / "cgroup.kill").is_file() and (cgroup / "cgroup.kill").read_text() == "1"
            )
            original()

        init.exited.set = set_exited  # type: ignore[method-assign]
        containers._exited(container, init, signal.SIGKILL)
        assert init.exited.is_set() and init.status == 137

    asyncio.run(main())
    return cgroup, reported


def test_a_pod_member_whose_init_exits_has_the_rest_killed_before_its_exit_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="guest.vminitd.containers"):
        _, reported = exit_of(tmp_path, own=False, procs="52\n53\n")
    assert reported == [True]
    assert "container app: its init exited; killed the 2 processes left in its cgroup (52 53)" in caplog.text


def test_a_container_owning_its_pid_namespace_is_left_to_the_kernel(tmp_path: Path) -> None:
    cgroup, reported = exit_of(tmp_path, own=True, procs="52\n")
    assert reported == [False]
    assert (cgroup / "cgroup.kill").read_text() == ""


def test_an_empty_cgroup_is_not_written(tmp_path: Path) -> None:
    cgroup, _ = exit_of(tmp_path, own=False, procs="")
    assert (cgroup / "cgroup.kill").read_text() == ""


def test_a_kill_that_fails_is_named_and_the_exit_still_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="guest.vminitd.containers"):
        exit_of(tmp_path, own=False, procs="52\n", kill_file=False)
    assert "container app: cannot kill the processes its init left (52)" in caplog.text


@pytest.mark.parametrize(
    ("procs", "exited", "crun_deletes"),
    [("", True, []), ("57\n", True, ["app"]), ("", False, ["app"])],
    ids=["all ended", "a process left", "init running"],
)
def test_shutdown_runs_crun_delete_only_where_a_process_may_be_left(
    tmp_path: Path, procs: str, exited: bool, crun_deletes: list[str]
) -> None:
    """At the VM's shutdown a container whose processes have all ended (its init exited, its
    cgroup empty) is forgotten without a `crun delete`: its state and cgroup end with the VM."""
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "cgroup.procs").write_text(procs)
    config = RuntimeConfig(state_dir=tmp_path / "state", rootfs_dir=tmp_path / "rootfs")
    init = Process("app", "", pb.IoConfig(), pid=0)
    container = Container("app", tmp_path / "bundle", tmp_path / "rootfs", init, cgroup)
    (tmp_path / "bundle").mkdir()
    deleted: list[str] = []

    async def main() -> None:
        containers = Containers(config, Reaper())

        async def crun(*args: str, **_: object) -> None:
            assert args[:2] == ("delete", "--force")
            deleted.append(args[2])

        containers.crun.run = crun  # type: ignore[method-assign]
        containers.containers["app"] = container
        if exited:
            init.exited.set()
        await containers.shutdown()
        assert containers.containers == {}

    asyncio.run(main())
    assert deleted == crun_deletes
    assert not (tmp_path / "bundle").exists()
