"""VM size from the OCI resources, and the io.spinbox.* annotations."""

from __future__ import annotations

from typing import Any

import pytest

from spinbox.shim.sizing import (
    GUEST_OVERHEAD_MIB,
    MIN_MEMORY_MIB,
    SizingError,
    VmSizing,
    count_cpuset,
    sizing_from_spec,
)


def spec(
    cpu: dict[str, Any] | None = None, memory: dict[str, Any] | None = None, **annotations: str
) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if cpu is not None:
        resources["cpu"] = cpu
    if memory is not None:
        resources["memory"] = memory
    return {"linux": {"resources": resources}, "annotations": annotations}


def test_no_limits_leave_spinboxd_defaults() -> None:
    assert sizing_from_spec({}) == VmSizing()
    assert sizing_from_spec(spec(cpu={"shares": 1024})) == VmSizing()


@pytest.mark.parametrize(
    ("cpu", "vcpus"),
    [
        ({"quota": 150000, "period": 100000}, 2),
        ({"quota": 50000, "period": 100000}, 1),
        ({"quota": 400000}, 4),
        ({"cpus": "0-3,6"}, 5),
        ({"cpus": "2"}, 1),
        ({"quota": -1, "cpus": "0-1"}, 2),
    ],
)
def test_vcpus_from_quota_or_cpuset(cpu: dict[str, Any], vcpus: int) -> None:
    assert sizing_from_spec(spec(cpu=cpu)).vcpus == vcpus


def test_memory_limit_plus_guest_overhead() -> None:
    sized = sizing_from_spec(spec(memory={"limit": 256 * 1024 * 1024}))
    assert sized.memory_mib == 256 + GUEST_OVERHEAD_MIB
    assert sizing_from_spec(spec(memory={"limit": 1024})).memory_mib == MIN_MEMORY_MIB


def test_annotations_override() -> None:
    sized = sizing_from_spec(
        spec(
            cpu={"quota": 100000},
            **{
                "io.spinbox.vcpus": "3",
                "io.spinbox.memory-mib": "512",
                "io.spinbox.kernel-args": "quiet  loglevel=3",
            },
        )
    )
    assert sized == VmSizing(vcpus=3, memory_mib=512, kernel_args=("quiet", "loglevel=3"))


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"io.spinbox.cpus": "2"}, "unknown annotation io.spinbox.cpus"),
        ({"io.spinbox.vcpus": "two"}, "not a whole number"),
        ({"io.spinbox.vcpus": "0"}, "out of range"),
        ({"io.spinbox.memory-mib": "128"}, "out of range"),
        ({"io.spinbox.kernel-args": "spinbox.vm=evil"}, "spinbox's own argument"),
    ],
)
def test_bad_annotations_are_rejected_with_a_sentence(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(SizingError, match=message):
        sizing_from_spec(spec(**annotations))


def test_other_annotations_are_ignored() -> None:
    assert sizing_from_spec(spec(**{"io.kubernetes.cri.sandbox-id": "x"})) == VmSizing()


def test_bad_cpuset_is_rejected() -> None:
    with pytest.raises(SizingError, match="CPU list"):
        count_cpuset("a-b")
    with pytest.raises(SizingError, match="empty or negative"):
        count_cpuset("3-1")
