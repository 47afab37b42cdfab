"""A Create given up while spinboxd is still creating the VM (the request
cancelled, or spinboxd's answer past its deadline) asks spinboxd to remove
the VM by id: spinboxd answers that once the creation has ended, so the VM
is not left running with nobody to stop it. A VM of the same id that was
there before (AlreadyExists) is left alone."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from spinbox.busclient import SpinboxdError
from spinbox.shim.errors import ShimError
from spinbox.shim.spinboxd import VmInfo, VmRequest
from tests.unit.shim.test_service import (
    FakeAgent,
    FakeSpinboxd,
    Recorder,
    create_request,
    make_bundle,
    make_service,
)


class SlowSpinboxd(FakeSpinboxd):
    """CreateVM that spinboxd is still working on when the shim gives up."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: list[tuple[str, bool]] = []
        self.started = asyncio.Event()

    async def create_vm(self, request: VmRequest) -> VmInfo:
        self.live.add(request.vm_id)
        self.started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def stop_vm(self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120) -> None:
        self.stopped.append((vm_id, kill))
        self.live.discard(vm_id)


def test_a_cancelled_create_removes_the_vm_spinboxd_was_creating(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    spinboxd = SlowSpinboxd()

    async def scenario() -> None:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        create = asyncio.create_task(service.create(create_request(make_bundle(tmp_path), log)))
        await asyncio.wait_for(spinboxd.started.wait(), 10)
        create.cancel()
        with pytest.raises((asyncio.CancelledError, ShimError)):
            await create

    asyncio.run(scenario())
    assert spinboxd.stopped == [("default-c1", True)]
    assert not spinboxd.live


def test_a_create_refused_as_a_duplicate_leaves_the_existing_vm_alone(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    exists = SpinboxdError("org.spinstack.Spinbox.Error.AlreadyExists", "VM 'default-c1' already exists")
    spinboxd = FakeSpinboxd(fail=exists)
    spinboxd.live.add("default-c1")

    async def scenario() -> None:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        await service.create(create_request(make_bundle(tmp_path), log))

    with pytest.raises(ShimError, match="already exists"):
        asyncio.run(scenario())
    assert spinboxd.live == {"default-c1"}


def pod_bundle(tmp_path: Path) -> tuple[Path, Path]:
    bundle = make_bundle(
        tmp_path, **{"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "c1"}
    )
    spec = json.loads((bundle / "config.json").read_text())
    netns = tmp_path / "netns"
    own = [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")]
    spec["linux"]["namespaces"] = [*own, {"type": "network", "path": str(netns)}]
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle, netns


class NoForwardSpinboxd(FakeSpinboxd):
    """spinboxd that cannot add the port-forward rule (it named what failed, and left nothing)."""

    async def open_port_forward(self, path: str) -> int:
        raise SpinboxdError(
            "org.spinstack.Spinbox.Error.Failed",
            "opening port-forward into VM 'default-c1' failed: cannot add the port-forward rule to"
            " the network namespace /run/netns/cni-1 of VM default-c1: iptables: No chain/target/match"
            " by that name.",
        )


def test_a_pod_whose_port_forward_cannot_be_set_up_is_refused_and_its_vm_removed(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    bundle, _ = pod_bundle(tmp_path)
    spinboxd = NoForwardSpinboxd()

    async def scenario() -> None:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        await service.create(create_request(bundle, log))

    with pytest.raises(
        ShimError, match=r"cannot add the port-forward rule to the network namespace .* No chain"
    ):
        asyncio.run(scenario())
    assert not spinboxd.live


class WrongListenerSpinboxd(FakeSpinboxd):
    def __init__(self) -> None:
        super().__init__()
        self.fds: list[int] = []

    async def open_port_forward(self, path: str) -> int:
        self.fds.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach())
        return self.fds[-1]


def test_a_listener_that_is_not_one_is_refused_closed_and_the_pods_vm_removed(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    bundle, netns = pod_bundle(tmp_path)
    spinboxd = WrongListenerSpinboxd()

    async def scenario() -> None:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        await service.create(create_request(bundle, log))

    with pytest.raises(
        ShimError, match=f"listener for the network namespace {netns} of pod 'c1' is not a listening"
    ):
        asyncio.run(scenario())
    assert not spinboxd.live
    with pytest.raises(OSError):
        os.fstat(spinboxd.fds[0])


class NoNetworkSpinboxd(FakeSpinboxd):
    """spinboxd whose VMs have no network (network.enabled off)."""

    async def open_port_forward(self, path: str) -> int:
        raise SpinboxdError(
            "org.spinstack.Spinbox.Error.NoNetwork",
            "VM 'default-c1' has no network: there are no ports to forward from the host",
        )


def test_a_pod_whose_vm_has_no_network_runs_without_port_forward(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "out.log"
    bundle, _ = pod_bundle(tmp_path)
    spinboxd = NoNetworkSpinboxd()

    async def scenario() -> None:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        await service.create(create_request(bundle, log))

    asyncio.run(scenario())
    assert spinboxd.live
    assert "pod c1: no port-forward: " in caplog.text and "has no network" in caplog.text
