"""containerd with Debian's configuration plus spinbox's CRI snippets, the
way the README says to add them, loads its CRI plugin with the `spinbox`
handler and keeps `runc` and Debian's CNI directory. A containerd of the
test's own, on private paths: Debian's 1.6, and 2.x where
tools/install-test-clients put it."""

from __future__ import annotations

import subprocess
import time
import tomllib
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[3]
SNIPPETS = TOP / "packaging" / "containerd"
CONTAINERD2 = Path("/opt/spinbox-test/containerd2")


def debian_config(root: Path = Path("/")) -> str:
    path = root / "etc" / "containerd" / "config.toml"
    return path.read_text() if path.exists() else "version = 2\n"


def loaded(bindir: Path, config: Path, tmp_path: Path) -> tuple[list[list[str]], dict[str, object]]:
    """The plugin table of a containerd started with `config`, and its merged configuration."""
    sock = tmp_path / "containerd.sock"
    argv = [
        str(bindir / "containerd"),
        "--config", str(config),
        "--root", str(tmp_path / "root"),
        "--state", str(tmp_path / "state"),
        "--address", str(sock),
    ]  # fmt: skip
    log_path = tmp_path / "containerd.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        ctr = [str(bindir / "ctr"), "--address", str(sock)]
        deadline = time.monotonic() + 60
        while subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode != 0:
            assert daemon.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "containerd did not answer"
            time.sleep(0.2)
        plugins = subprocess.run([*ctr, "plugins", "ls"], capture_output=True, text=True, check=True).stdout
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    dump = subprocess.run(
        [argv[0], "--config", str(config), "config", "dump"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split() for line in plugins.splitlines()], tomllib.loads(dump)


def assert_handler(plugins: list[list[str]], runtimes: dict[str, dict[str, object]], cri: list[str]) -> None:
    status = [row[-1] for row in plugins if row[:2] == cri]
    assert status == ["ok"], plugins
    assert runtimes["spinbox"]["runtime_type"] == "io.containerd.spinbox.v1"
    assert runtimes["spinbox"]["privileged_without_host_devices"] is True
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2", "the default runtime must stay"


def test_containerd_1_6_with_the_appended_snippet(tmp_path: Path) -> None:
    base = debian_config()
    config = tmp_path / "config.toml"
    config.write_text(base + "\n" + (SNIPPETS / "cri-v2.toml").read_text())
    plugins, merged = loaded(Path("/usr/bin"), config, tmp_path)
    cri = merged["plugins"]["io.containerd.grpc.v1.cri"]  # type: ignore[index]
    assert_handler(plugins, cri["containerd"]["runtimes"], ["io.containerd.grpc.v1", "cri"])
    if "/usr/lib/cni" in base:
        assert cri["cni"]["bin_dir"] == "/usr/lib/cni"


@pytest.mark.skipif(not (CONTAINERD2 / "usr/bin/containerd").exists(), reason="no containerd 2.x installed")
@pytest.mark.parametrize("how", ["appended", "conf.d"])
def test_containerd_2_with_either_snippet(tmp_path: Path, how: str) -> None:
    """Debian's containerd 2.x still ships a version 2 config.toml (migrated at
    load): appending cri-v2.toml works as with 1.x, and so does cri-v3.toml in
    a conf.d directory that the main file imports."""
    base = debian_config(CONTAINERD2)
    config = tmp_path / "config.toml"
    if how == "appended":
        config.write_text(base + "\n" + (SNIPPETS / "cri-v2.toml").read_text())
    else:
        (tmp_path / "conf.d").mkdir()
        (tmp_path / "conf.d" / "spinbox.toml").write_text((SNIPPETS / "cri-v3.toml").read_text())
        config.write_text(f'imports = ["{tmp_path}/conf.d/*.toml"]\n' + base)
    plugins, merged = loaded(CONTAINERD2 / "usr" / "bin", config, tmp_path)
    cri = merged["plugins"]["io.containerd.cri.v1.runtime"]  # type: ignore[index]
    assert_handler(plugins, cri["containerd"]["runtimes"], ["io.containerd.cri.v1", "runtime"])
    if "/usr/lib/cni" in base:
        assert "/usr/lib/cni" in cri["cni"]["bin_dirs"]
