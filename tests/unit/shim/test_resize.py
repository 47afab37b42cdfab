"""Update resizes the VM around the cgroup limits, in the order that lets the guest give memory back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from spinbox.busclient import SpinboxdError
from spinbox.shim.errors import ShimError
from spinbox.shim.protos import Any as AnyMessage
from spinbox.shim.protos import task
from spinbox.shim.resize import VmSize, own_vm_size, pod_vm_size
from tests.unit.shim.test_service import FakeAgent, FakeSpinboxd, Recorder, make_bundle, make_service

GIB = 1024 * 1024 * 1024
VM = "/org/spinstack/Spinbox/vm/default-c1"


def resources(memory: int, quota: int = 0) -> dict[str, object]:
    value: dict[str, object] = {"memory": {"limit": memory}}
    if quota:
        value["cpu"] = {"quota": quota, "period": 100_000}
    return value


def update(container_id: str, value: dict[str, object]) -> task.UpdateTaskRequest:
    any_ = AnyMessage(type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources")
    any_.value = json.dumps(value).encode()
    return task.UpdateTaskRequest(id=container_id, resources=any_)


def test_sizes() -> None:
    boot = VmSize(1, 512)
    assert own_vm_size(boot, resources(GIB, 200_000)) == VmSize(2, 1024 + 128)
    assert own_vm_size(boot, resources(64 * 1024 * 1024)) == boot  # never below the boot size
    assert pod_vm_size(boot, [resources(GIB, 150_000), resources(GIB // 4), {}]) == VmSize(
        3, 512 + 1024 + 256
    )


def test_update_grows_the_vm_first_and_shrinks_it_last(tmp_path: Path) -> None:
    agent, spinboxd = FakeAgent([]), FakeSpinboxd()
    bundle = make_bundle(tmp_path)

    async def scenario() -> None:
        service = make_service(agent, spinboxd, Recorder(tmp_path / "log"))
        await service.create(task.CreateTaskRequest(id="c1", bundle=str(bundle)))
        await service.update(update("c1", resources(GIB, 200_000)))
        assert spinboxd.calls[-1] == f"Resize {VM} 2 1152" and len(agent.updates) == 1
        assert spinboxd.sizes[VM] == (2, 1152)
        await service.update(update("c1", resources(GIB // 8)))
        assert agent.updates[-1] == resources(GIB // 8)
        assert spinboxd.calls[-1] == f"Resize {VM} 1 512"

    asyncio.run(scenario())


def test_a_failed_shrink_puts_the_limits_back(tmp_path: Path) -> None:
    agent, spinboxd = FakeAgent([]), FakeSpinboxd()
    bundle = make_bundle(tmp_path)

    async def scenario() -> None:
        service = make_service(agent, spinboxd, Recorder(tmp_path / "log"))
        await service.create(task.CreateTaskRequest(id="c1", bundle=str(bundle)))
        await service.update(update("c1", resources(GIB)))
        spinboxd.fail = SpinboxdError(
            "org.spinstack.Spinbox.Error.Failed", "the guest could not give back 640 MiB"
        )
        with pytest.raises(ShimError) as error:
            await service.update(update("c1", resources(GIB // 8)))
        assert "could not give back" in str(error.value)
        # Lowered, then put back as the last successful update left them.
        assert agent.updates[-2:] == [resources(GIB // 8), resources(GIB)]
        assert spinboxd.sizes[VM] == (1, 1152)

    asyncio.run(scenario())


def test_update_refuses_resources_that_are_not_json(tmp_path: Path) -> None:
    agent, spinboxd = FakeAgent([]), FakeSpinboxd()
    bundle = make_bundle(tmp_path)

    async def scenario() -> None:
        service = make_service(agent, spinboxd, Recorder(tmp_path / "log"))
        await service.create(task.CreateTaskRequest(id="c1", bundle=str(bundle)))
        any_ = AnyMessage(type_url="x", value=b"\x08\x01")
        with pytest.raises(ShimError) as error:
            await service.update(task.UpdateTaskRequest(id="c1", resources=any_))
        assert error.value.code == "INVALID_ARGUMENT"
        assert not agent.updates

    asyncio.run(scenario())
