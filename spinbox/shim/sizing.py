"""How big a container's VM is: from the OCI resources, overridden by
`io.spinbox.*` annotations.

Annotations (all optional):
- `io.spinbox.vcpus`: number of virtual CPUs, 1-255.
- `io.spinbox.memory-mib`: guest memory in MiB, 192-1048576.
- `io.spinbox.kernel-args`: extra guest kernel arguments, separated by spaces.

Any other `io.spinbox.*` key is an error, so that a typo is never silently ignored.
What the spec leaves open (no CPU or memory limit) is left to spinboxd's
defaults from spinbox.toml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ANNOTATION_PREFIX = "io.spinbox."
VCPUS = "io.spinbox.vcpus"
MEMORY_MIB = "io.spinbox.memory-mib"
KERNEL_ARGS = "io.spinbox.kernel-args"
KNOWN_ANNOTATIONS = (VCPUS, MEMORY_MIB, KERNEL_ARGS)

MAX_VCPUS = 255
# The guest's kernel unpacks its initrd and starts vminitd in RAM: measured,
# 128 MiB does not boot and 192 MiB leaves about 80 MiB free.
MIN_MEMORY_MIB = 192
MAX_MEMORY_MIB = 1024 * 1024
# The guest kernel, vminitd and page cache need room beyond the container's own limit.
GUEST_OVERHEAD_MIB = 128
MIB = 1024 * 1024


class SizingError(ValueError):
    """A resource or annotation in the spec that spinbox cannot honour."""


@dataclass(frozen=True)
class VmSizing:
    """The VM size and kernel arguments a spec asks for."""

    vcpus: int | None = None  # None: spinboxd's default
    memory_mib: int | None = None
    kernel_args: tuple[str, ...] = ()


def count_cpuset(cpus: str) -> int:
    """Number of CPUs in a cpuset list such as "0-3,6"."""
    count = 0
    for part in cpus.split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise SizingError(f"linux.resources.cpu.cpus {cpus!r} is not a CPU list like 0-3,6") from None
        if first < 0 or last < first:
            raise SizingError(f"linux.resources.cpu.cpus {cpus!r} has an empty or negative range {part!r}")
        count += last - first + 1
    return count


def vcpus_from_resources(cpu: dict[str, Any]) -> int | None:
    quota = cpu.get("quota")
    period = cpu.get("period") or 100_000
    if isinstance(quota, int) and quota > 0 and isinstance(period, int) and period > 0:
        return min(MAX_VCPUS, max(1, math.ceil(quota / period)))
    cpus = cpu.get("cpus")
    if isinstance(cpus, str) and cpus.strip():
        return min(MAX_VCPUS, max(1, count_cpuset(cpus)))
    return None


def memory_from_resources(memory: dict[str, Any]) -> int | None:
    limit = memory.get("limit")
    if isinstance(limit, int) and limit > 0:
        return min(MAX_MEMORY_MIB, max(MIN_MEMORY_MIB, math.ceil(limit / MIB) + GUEST_OVERHEAD_MIB))
    return None


def _int_annotation(key: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value.strip(), 10)
    except ValueError:
        raise SizingError(f"annotation {key}={value!r} is not a whole number") from None
    if not low <= number <= high:
        raise SizingError(f"annotation {key}={value!r} is out of range ({low}-{high})")
    return number


def validate_annotations(annotations: dict[str, str]) -> None:
    unknown = sorted(k for k in annotations if k.startswith(ANNOTATION_PREFIX) and k not in KNOWN_ANNOTATIONS)
    if unknown:
        raise SizingError(f"unknown annotation {unknown[0]}; spinbox knows {', '.join(KNOWN_ANNOTATIONS)}")


def sizing_from_spec(spec: dict[str, Any]) -> VmSizing:
    """The VM size for an OCI runtime spec (config.json, parsed)."""
    annotations = spec.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise SizingError("annotations in config.json must be an object of strings")
    annotations = {str(k): str(v) for k, v in annotations.items()}
    validate_annotations(annotations)
    resources = (spec.get("linux") or {}).get("resources") or {}
    vcpus = vcpus_from_resources(resources.get("cpu") or {})
    memory = memory_from_resources(resources.get("memory") or {})
    if VCPUS in annotations:
        vcpus = _int_annotation(VCPUS, annotations[VCPUS], 1, MAX_VCPUS)
    if MEMORY_MIB in annotations:
        memory = _int_annotation(MEMORY_MIB, annotations[MEMORY_MIB], MIN_MEMORY_MIB, MAX_MEMORY_MIB)
    kernel_args: tuple[str, ...] = ()
    if KERNEL_ARGS in annotations:
        kernel_args = tuple(annotations[KERNEL_ARGS].split())
        for arg in kernel_args:
            if arg.startswith("spinbox."):
                raise SizingError(f"annotation {KERNEL_ARGS} may not set spinbox's own argument {arg!r}")
    return VmSizing(vcpus=vcpus, memory_mib=memory, kernel_args=kernel_args)
