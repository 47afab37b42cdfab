"""Static checks of the packaging: the containerd snippets say what containerd
understands, the versions agree, the test image is well formed."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

from tests.harness.oci import build_image

TOP = Path(__file__).resolve().parents[3]
CONTAINERD = TOP / "packaging" / "containerd"
DEBIAN_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")


def test_changelog_version_is_the_package_version() -> None:
    import spinbox

    changelog = (TOP / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"spinbox ({spinbox.__version__})"), changelog


@pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed")
def test_cri_v2_snippet_appended_to_debians_config_adds_the_handler(tmp_path: Path) -> None:
    """containerd 1.6/1.7: the snippet appended to the main file adds the
    `spinbox` handler and keeps the rest (Debian's CNI plugin directory)."""
    base = DEBIAN_CONTAINERD_CONFIG.read_text() if DEBIAN_CONTAINERD_CONFIG.exists() else "version = 2\n"
    config = tmp_path / "config.toml"
    config.write_text(base + "\n" + (CONTAINERD / "cri-v2.toml").read_text())
    dump = subprocess.run(
        ["containerd", "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    cri = tomllib.loads(dump)["plugins"]["io.containerd.grpc.v1.cri"]
    runtimes = cri["containerd"]["runtimes"]
    assert runtimes["spinbox"]["runtime_type"] == "io.containerd.spinbox.v1"
    assert runtimes["spinbox"]["privileged_without_host_devices"] is True
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2", "the default runtime must stay"
    if "/usr/lib/cni" in base:
        assert cri["cni"]["bin_dir"] == "/usr/lib/cni"


def test_cri_v3_snippet_names_the_handler() -> None:
    config = tomllib.loads((CONTAINERD / "cri-v3.toml").read_text())
    assert config["version"] == 3
    runtimes = config["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
    assert runtimes["spinbox"]["runtime_type"] == "io.containerd.spinbox.v1"
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"


def test_busybox_image_is_a_consistent_oci_layout(tmp_path: Path) -> None:
    out = build_image(tmp_path / "image.tar", "localhost/test/busybox:1")
    with tarfile.open(out) as tar:
        blobs = {
            m.name.removeprefix("blobs/sha256/"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile() and m.name.startswith("blobs/sha256/")
        }
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    for digest, data in blobs.items():
        assert hashlib.sha256(data).hexdigest() == digest
    (entry,) = index["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == "localhost/test/busybox:1"
    manifest = json.loads(blobs[entry["digest"].removeprefix("sha256:")])
    layer = blobs[manifest["layers"][0]["digest"].removeprefix("sha256:")]
    with tarfile.open(fileobj=io.BytesIO(layer)) as rootfs:
        names = set(rootfs.getnames())
    assert {"bin/busybox", "bin/sh", "bin/uname"} <= names
    assert build_image(tmp_path / "again.tar", "localhost/test/busybox:1").read_bytes() == out.read_bytes()


def test_readme_opens_with_the_two_commands() -> None:
    lines = (TOP / "README.md").read_text().splitlines()
    commands = [line.strip() for line in lines[:12] if line.startswith("    ")]
    assert commands == ["make test", "make demo"]
    targets = (TOP / "Makefile").read_text()
    assert "\ndemo:" in targets and "\ndeb:" in targets
