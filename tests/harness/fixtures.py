"""pytest fixtures shared by the integration and e2e tiers."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.systemd import PrivateSystemd

TOP = Path(__file__).resolve().parents[2]


def artifacts_dir() -> Path:
    """Where tests keep logs and build outputs that outlive one test (git-ignored)."""
    path = Path(os.environ.get("SPINBOX_TEST_ARTIFACTS", TOP / "build" / "test"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def systemd() -> Iterator[PrivateSystemd]:
    """One private systemd for the whole session; tests must leave it as they found it."""
    if os.geteuid() != 0:
        pytest.skip("the private systemd needs root")
    with PrivateSystemd.booted(artifacts_dir() / "logs") as instance:
        yield instance


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The real guest image (vminitd as PID 1), built once per session into build/test/guest/."""
    if importlib.util.find_spec("guest.vminitd") is None:
        pytest.skip("guest.vminitd is not in this tree yet")
    from guest.mkguest.image import ImageConfig, build
    from spinbox.vm.spec import default_kernel

    output = artifacts_dir() / "guest" / "initrd.img"
    build(ImageConfig(kernel_version=default_kernel().name.removeprefix("vmlinuz-")), output)
    return output
