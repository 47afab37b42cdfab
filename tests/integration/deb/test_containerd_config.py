"""containerd 1.6 with Debian's configuration plus spinbox's CRI snippet (as
the README says to append it) loads its CRI plugin with the `spinbox`
handler. A containerd of the test's own, on private paths."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[3]
DEBIAN_CONFIG = Path("/etc/containerd/config.toml")


def test_cri_plugin_loads_with_the_spinbox_handler(tmp_path: Path) -> None:
    base = DEBIAN_CONFIG.read_text() if DEBIAN_CONFIG.exists() else "version = 2\n"
    config = tmp_path / "config.toml"
    config.write_text(base + "\n" + (TOP / "packaging" / "containerd" / "cri-v2.toml").read_text())
    sock = tmp_path / "containerd.sock"
    argv = [
        "containerd",
        "--config", str(config),
        "--root", str(tmp_path / "root"),
        "--state", str(tmp_path / "state"),
        "--address", str(sock),
    ]  # fmt: skip
    with open(tmp_path / "containerd.log", "wb") as log:
        daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        ctr = ["ctr", "--address", str(sock)]
        deadline = time.monotonic() + 60
        while subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode != 0:
            assert daemon.poll() is None, (tmp_path / "containerd.log").read_text()
            assert time.monotonic() < deadline, "containerd did not answer"
            time.sleep(0.2)
        plugins = subprocess.run([*ctr, "plugins", "ls"], capture_output=True, text=True, check=True).stdout
        rows = [line.split() for line in plugins.splitlines()]
        cri = [row for row in rows if row[:2] == ["io.containerd.grpc.v1", "cri"]]
        assert cri and cri[0][-1] == "ok", plugins + (tmp_path / "containerd.log").read_text()[-3000:]
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
