"""Static checks of the packaging: the versions agree, the README opens with
the two commands, the test image is well formed."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from tests.harness.oci import build_image

TOP = Path(__file__).resolve().parents[3]


def test_changelog_version_is_the_package_version() -> None:
    import spinbox

    changelog = (TOP / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"spinbox ({spinbox.__version__})"), changelog


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
