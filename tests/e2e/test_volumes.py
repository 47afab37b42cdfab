"""Host directories and files shared into spinbox containers over virtio-fs.

ctr's --mount (containerd 1.6 and 2.x), nerdctl's named volumes and a CRI
pod's emptyDir and configMap-style volume: changes are live both ways,
read-only mounts stay read-only on the host whatever the guest remounts, a
mount a VM cannot give fails the create with a sentence, and nothing (no
virtiofsd, no mount, no share directory) is left after a delete.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.stack import (
    BUILDS,
    IMAGE,
    NOTHING_LEFT,
    RUNTIME,
    Containerd,
    wait_until_clean,
)
from tests.harness.systemd import PrivateSystemd

# Under /etc, which is an overlay private to the test's systemd.
HOST_DIR = "/etc/spinbox-e2e-volumes"
CRI_WORK = "/run/spinbox-e2e-volumes"
GIB = 1 << 30


def preferred_build() -> str:
    """containerd 2.x where installed (nerdctl needs it), else Debian's 1.6."""
    return "2.x" if BUILDS["2.x"].available else "1.6"


def eventually(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout:g}s")
        time.sleep(0.3)


def exec_in(containerd: Containerd, container: str, script: str, exec_id: str) -> tuple[int, str]:
    result = containerd.ctr("task", "exec", "--exec-id", exec_id, container, "sh", "-c", script, check=False)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module", params=["1.6", "2.x"])
def containerd(request: pytest.FixtureRequest, stack: PrivateSystemd) -> Iterator[Containerd]:
    build = BUILDS[request.param]
    if not build.available:
        pytest.skip(f"containerd {build.name} is not installed")
    with Containerd.running(stack, build) as instance:
        yield instance


def test_ctr_volumes_are_live_both_ways_and_read_only_ones_stay_read_only_on_the_host(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    rw, ro = f"{HOST_DIR}/rw", f"{HOST_DIR}/ro"
    stack.run("mkdir", "-p", rw, ro)
    stack.write_file(f"{ro}/kept", "read-only content\n")
    stack.write_file(f"{HOST_DIR}/file", "a single file\n")
    name = "vol-" + containerd.build.name.replace(".", "")
    containerd.ctr(
        "run", "-d", "--privileged", "--runtime", RUNTIME,
        "--mount", f"type=bind,src={rw},dst=/rw,options=rbind:rw",
        "--mount", f"type=bind,src={ro},dst=/ro,options=rbind:ro",
        "--mount", f"type=bind,src={HOST_DIR}/file,dst=/etc/single,options=bind:ro",
        IMAGE, name, "sleep", "600",
    )  # fmt: skip
    try:
        # The container's write is on the host while the container runs.
        code, out = exec_in(containerd, name, "echo from-the-container > /rw/out", "w1")
        assert code == 0, out
        assert stack.path(f"{rw}/out").read_text() == "from-the-container\n"
        # The host's write is seen by the running container.
        stack.write_file(f"{rw}/in", "from-the-host\n")
        eventually(
            "the host's file in the container",
            lambda: exec_in(containerd, name, "cat /rw/in", "r1") == (0, "from-the-host\n"),
        )
        code, out = exec_in(containerd, name, "cat /etc/single /ro/kept", "r2")
        assert (code, out) == (0, "a single file\nread-only content\n")
        # Read-only: EROFS, and still so after the guest remounts it read-write.
        code, out = exec_in(containerd, name, "echo x > /ro/new", "w2")
        assert code != 0 and "Read-only file system" in out, out
        code, out = exec_in(containerd, name, "mount -o remount,rw /ro && echo remounted", "m1")
        assert "remounted" in out, out
        code, out = exec_in(containerd, name, "echo x > /ro/new; echo x >> /ro/kept", "w3")
        assert code != 0, out
        assert not stack.path(f"{ro}/new").exists()
        assert stack.path(f"{ro}/kept").read_text() == "read-only content\n"
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", name, check=False)
        time.sleep(1)
        containerd.ctr("task", "delete", "-f", name, check=False)
        containerd.ctr("containers", "delete", name, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_a_socket_or_device_bind_fails_the_create_naming_the_mount(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    socket_path = f"{HOST_DIR}/app.sock"
    stack.run("python3", "-c", f"import socket; socket.socket(socket.AF_UNIX).bind({socket_path!r})")
    for source, kind in ((socket_path, "a socket"), ("/dev/null", "a device node")):
        result = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME,
            "--mount", f"type=bind,src={source},dst=/mnt/x,options=rbind",
            IMAGE, "vol-bad", "true",
            check=False,
        )  # fmt: skip
        assert result.returncode != 0
        assert f"bind mount of {source} at /mnt/x: the source is {kind}" in result.stderr, result.stderr
        containerd.ctr("containers", "delete", "vol-bad", check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_a_gib_written_through_a_volume_arrives_intact(containerd: Containerd, stack: PrivateSystemd) -> None:
    if containerd.build.name != preferred_build():
        pytest.skip("one containerd build is enough for the data path")
    out_dir = f"{HOST_DIR}/big"
    stack.run("mkdir", "-p", out_dir)
    # Not sparse, not compressible to nothing: a line with a counter, repeated up to 1 GiB.
    script = (
        "i=0; while [ $i -lt 4096 ]; do echo $i; i=$((i+1)); done > /tmp/lines; "
        "while :; do cat /tmp/lines; done | head -c 1073741824 > /out/big; sync; stat -c %s /out/big"
    )
    started = time.monotonic()
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME,
        "--mount", f"type=bind,src={out_dir},dst=/out,options=rbind:rw",
        IMAGE, "vol-big", "sh", "-c", script,
        check=False, timeout=900,
    )  # fmt: skip
    print(f"1 GiB through a volume: {time.monotonic() - started:.1f} s (with the VM's boot)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(GIB)
    lines = "".join(f"{i}\n" for i in range(4096)).encode()
    expected = hashlib.sha256()
    remaining = GIB
    while remaining:
        chunk = lines[: min(len(lines), remaining)]
        expected.update(chunk)
        remaining -= len(chunk)
    digest = hashlib.sha256()
    with stack.path(f"{out_dir}/big").open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == expected.hexdigest()
    stack.path(f"{out_dir}/big").unlink()
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
