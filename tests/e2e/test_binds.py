"""Host files bind-mounted into spinbox containers read as they do under runc:
`ctr run --mount` of a host file, and the /etc/hosts nerdctl writes for
--add-host. The guest gets a copy of each file (up to 1 MiB); larger files
and directories are left out of the container."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.stack import (
    BUILDS,
    IMAGE,
    NERDCTL,
    NOTHING_LEFT,
    RUNTIME,
    Containerd,
    wait_until_clean,
)
from tests.harness.systemd import PrivateSystemd

# Under /etc, which is an overlay private to the test's systemd.
HOST_DIR = "/etc/spinbox-e2e-binds"


@pytest.fixture(scope="module")
def containerd(stack: PrivateSystemd) -> Iterator[Containerd]:
    """containerd 2.x where installed (nerdctl needs it), else Debian's 1.6."""
    build = BUILDS["2.x"] if BUILDS["2.x"].available else BUILDS["1.6"]
    instance = Containerd(stack, build)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def test_ctr_mount_of_a_host_file_shows_its_content_read_only(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    stack.write_file(f"{HOST_DIR}/f", "content from the host\n")
    stack.write_file(f"{HOST_DIR}/big", b"x" * (2 << 20))
    script = (
        "cat /data/f; "
        "echo changed > /data/f 2>/dev/null && echo writable || echo read-only; "
        "test -e /data/big && echo big-present || echo big-absent"
    )
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME,
        "--mount", f"type=bind,src={HOST_DIR}/f,dst=/data/f,options=rbind:ro",
        "--mount", f"type=bind,src={HOST_DIR}/big,dst=/data/big,options=rbind:ro",
        IMAGE, "bind1", "sh", "-c", script,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "content from the host\nread-only\nbig-absent\n"
    assert stack.path(f"{HOST_DIR}/f").read_text() == "content from the host\n"
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_nerdctl_add_host_appears_in_etc_hosts(containerd: Containerd, stack: PrivateSystemd) -> None:
    if containerd.build.name == "1.6":
        pytest.skip("nerdctl v2 needs containerd 1.7 or newer")
    if not NERDCTL.exists():
        pytest.skip("nerdctl is not installed (tools/install-test-clients)")
    result = containerd.nerdctl(
        "run", "--rm", "--runtime", RUNTIME, "--add-host", "foo:10.1.2.3", IMAGE, "cat", "/etc/hosts",
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert any(line.split() == ["10.1.2.3", "foo"] for line in result.stdout.splitlines()), result.stdout
    # nerdctl v2.1 leaves its client-side FIFOs behind, with runc as well.
    stack.run("sh", "-c", "rm -rf /run/containerd/fifo/*")
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
