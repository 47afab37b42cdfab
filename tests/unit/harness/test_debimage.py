"""The system container test image's recipe: the nested image Docker loads, the
host's apt sources it is built from, and its cache key."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.harness import debimage


def test_the_nested_image_is_a_docker_archive(tmp_path: Path) -> None:
    with tarfile.open(debimage.nested_archive(tmp_path / "nested.tar")) as tar:
        names = set(tar.getnames())
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    (image,) = manifest
    assert image["RepoTags"] == [debimage.NESTED_REFERENCE]
    assert {image["Config"], *image["Layers"]} <= names


def test_apt_sources_are_the_hosts_enabled_ones(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# nothing here\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\n"
    )
    (tmp_path / "sources.list.d" / "old.list.disabled").write_text("deb http://elsewhere.example/ x main\n")
    assert debimage.host_sources(tmp_path) == [tmp_path / "sources.list.d" / "debian.sources"]
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(RuntimeError, match="no apt sources"):
        debimage.host_sources(tmp_path)


def test_the_cache_key_follows_the_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "debian.sources"
    source.write_text("Types: deb\n")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF")
    key = debimage._cache_key("bookworm", [source], busybox)
    assert debimage._cache_key("bookworm", [source], busybox) == key
    assert debimage._cache_key("trixie", [source], busybox) != key
    monkeypatch.setattr(debimage, "PACKAGES", (*debimage.PACKAGES, "vim"))
    assert debimage._cache_key("bookworm", [source], busybox) != key
