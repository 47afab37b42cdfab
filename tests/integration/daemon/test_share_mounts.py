"""The share's mounts, for real, in a private mount namespace: a read-only volume is read-only in
every copy mount propagation makes (virtiofsd's namespace included, added before or after it
starts), and removing a share unmounts and never deletes through a mount."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TOP = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import os, subprocess, sys, time
sys.path.insert(0, TOP)
from pathlib import Path
from spinbox.daemon import mountapi, share
from spinbox.daemon.errors import InvalidArgument

work = Path(WORK)
source = work / "data"; source.mkdir()
(source / "kept").write_text("user data\n")
runtime = work / "vm"; runtime.mkdir()
directory = share.share_dir(runtime)
share.prepare(directory)
volumes = [share.Volume(str(source), True, True), share.Volume(str(source / "kept"), False, False)]
share.bind(directory, "c1", volumes)

# A slave copy of the share, as virtiofsd's namespace holds: made now, it receives later binds too.
peer = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sleep", "60"])
time.sleep(0.5)
share.bind(directory, "c2", [share.Volume(str(source), True, False)])
time.sleep(0.2)
seen = Path(f"/proc/{peer.pid}/mountinfo").read_text()
for name in ("c1/0", "c2/0"):
    line = next(l for l in seen.splitlines() if l.split()[4] == f"{directory}/{name}")
    assert line.split()[5].startswith("ro,"), line
line = next(l for l in seen.splitlines() if l.split()[4] == f"{directory}/c1/1")
assert line.split()[5].startswith("rw,"), line
try:
    (directory / "c1/0/new").write_text("x")
    raise AssertionError("a read-only volume was written")
except OSError as e:
    assert e.errno == 30
(directory / "c1/1").write_text("changed\n")
assert (source / "kept").read_text() == "changed\n"

sock = work / "s.sock"
import socket
s = socket.socket(socket.AF_UNIX); s.bind(str(sock))
try:
    volumes = [share.Volume(str(source), False, True), share.Volume(str(sock), False, False)]
    share.bind(directory, "c3", volumes)
    raise AssertionError("a socket was shared")
except InvalidArgument as e:
    assert "it is a socket" in str(e), e
assert not (directory / "c3").exists()

share.unbind(directory, "c2")
time.sleep(0.2)
assert f"{directory}/c2/0" not in Path(f"/proc/{peer.pid}/mountinfo").read_text()
share.remove_runtime_dir(runtime)
assert not runtime.exists()
assert (source / "kept").read_text() == "changed\n"
peer.kill()
print("ok")
"""


def test_share_mounts_are_read_only_everywhere_and_never_removed_through(tmp_path: Path) -> None:
    script = f"TOP = {str(TOP)!r}\nWORK = {str(tmp_path)!r}\n" + textwrap.dedent(SCRIPT)
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
