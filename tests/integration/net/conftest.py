"""Each networking test runs in a network namespace of its own, standing in for the host.

The test's thread (and the CNI plugins it starts) sees a fresh namespace with only
`lo`: the bridge, the iptables rules and every address the tests use live there
and vanish with it, so tests never touch the real host's network and parallel
runs never meet.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spinbox.net import NetConfig, collect_leftovers

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def host_netns() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            pytest.skip(f"cannot create a network namespace: {os.strerror(ctypes.get_errno())}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        yield
    finally:
        if _libc.setns(saved, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
        os.close(saved)


@pytest.fixture
def net_config(tmp_path: Path, host_netns: None) -> Iterator[NetConfig]:
    """spinbox's shipped network list, with its state and leases under the test's directory.

    Whatever a failing test left (namespace mounts, holder processes) is collected afterwards.
    """
    config = NetConfig(run_dir=tmp_path / "run")
    yield config
    asyncio.run(collect_leftovers([], config))
