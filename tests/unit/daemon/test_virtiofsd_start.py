"""QEMU starts once the VM's virtiofsd has taken its connection, within timeouts.virtiofsd_start."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from spinbox.daemon import share
from spinbox.daemon.errors import Failed
from spinbox.daemon.virtiofsd import VirtiofsConnection


def connection(runtime_dir: Path, timeout: float) -> VirtiofsConnection:
    listener, client = share.vhost_user_sockets(runtime_dir)
    return VirtiofsConnection(listener, client, timeout)


def test_ready_once_virtiofsd_accepts(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with connection(tmp_path, 10) as virtiofs:

            async def accept_later() -> None:
                await asyncio.sleep(0.2)
                accepted, _ = virtiofs.listener.accept()
                accepted.close()

            async def main() -> None:
                await asyncio.gather(virtiofs.accepted(sleeper), accept_later())

            asyncio.run(main())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_virtiofsd_that_never_accepts_fails_naming_the_timeout(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with connection(tmp_path, 0.3) as virtiofs, pytest.raises(Failed, match=r"timeouts\.virtiofsd_start"):
            asyncio.run(virtiofs.accepted(sleeper))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_virtiofsd_that_ends_fails_with_its_status(tmp_path: Path) -> None:
    ended = subprocess.Popen(["sh", "-c", "exit 3"])
    ended.wait()
    with connection(tmp_path, 10) as virtiofs, pytest.raises(Failed, match="status 3"):
        asyncio.run(virtiofs.accepted(ended))


def test_qemus_end_stays_open_until_closed(tmp_path: Path) -> None:
    virtiofs = connection(tmp_path, 1)
    assert virtiofs.qemu_fd >= 0
    virtiofs.close()
    assert virtiofs.client.fileno() == -1 and virtiofs.listener.fileno() == -1
    assert not any(p.suffix == ".sock" for p in tmp_path.iterdir())
