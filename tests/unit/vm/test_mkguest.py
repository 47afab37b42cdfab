"""spinbox-mkguest: what goes into the guest image, and that it is reproducible."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from guest.mkguest.__main__ import main as mkguest_main
from guest.mkguest.errors import BuildError
from guest.mkguest.image import BUSYBOX, ImageConfig, build
from guest.mkguest.kmod import ModuleTree
from guest.vminitd import boot
from spinbox.vm.spec import default_kernel

TRIVIAL_INIT = """
import json
import os


def main() -> None:
    print(json.dumps({"hello": os.getpid()}), flush=True)
"""


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int], int]]:
    """path -> (mode, contents, (rdev major, minor), mtime) of an uncompressed newc archive."""
    entries = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, size, rmajor, rminor, namesize = (fields[i] for i in (1, 5, 6, 9, 10, 11))
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body : body + size], (rmajor, rminor), mtime)
        offset = body + size + (-size % 4)


@pytest.fixture(scope="module")
def init_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("init")
    (root / "trivialinit").mkdir()
    (root / "trivialinit" / "__init__.py").write_text("")
    (root / "trivialinit" / "main.py").write_text(TRIVIAL_INIT)
    return root


def trivial_config(root: Path) -> ImageConfig:
    return ImageConfig(
        kernel_version=default_kernel().name.removeprefix("vmlinuz-"),
        entry="trivialinit.main:main",
        packages=("trivialinit",),
        roots=(root,),
        tools=(BUSYBOX,),
    )


@pytest.fixture(scope="module")
def image(init_root: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    output = tmp_path_factory.mktemp("image") / "initrd.img"
    build(trivial_config(init_root), output)
    return output.read_bytes()


def test_same_inputs_give_the_same_bytes(init_root: Path, image: bytes, tmp_path: Path) -> None:
    again = tmp_path / "again.img"
    build(trivial_config(init_root), again)
    assert again.read_bytes() == image


def test_compressed_images_are_reproducible_too(init_root: Path, tmp_path: Path) -> None:
    config = ImageConfig(**{**trivial_config(init_root).__dict__, "compression": "gzip"})
    build(config, tmp_path / "a.img")
    build(config, tmp_path / "b.img")
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    assert (tmp_path / "a.img").read_bytes()[:2] == b"\x1f\x8b"


def test_image_layout(image: bytes) -> None:
    entries = read_newc(image)
    paths = list(entries)
    assert paths == sorted(paths, key=lambda p: Path(p).parts)
    assert {mtime for _, _, _, mtime in entries.values()} == {0}
    mode, init, _, _ = entries["init"]
    assert mode & 0o111
    assert init.startswith(b"#!/usr/bin/python3")
    assert b"from trivialinit.main import main" in init
    for name, rdev in (("dev/console", (5, 1)), ("dev/null", (1, 3)), ("dev/urandom", (1, 9))):
        assert stat.S_ISCHR(entries[name][0]) and entries[name][2] == rdev
    assert stat.S_ISLNK(entries["bin"][0]) and entries["bin"][1] == b"usr/bin"
    assert "usr/bin/busybox" in entries
    assert "usr/lib/python3/dist-packages/trivialinit/main.pyc" in entries
    assert "usr/lib/python3.11/json/__init__.pyc" in entries  # imported by the entry
    assert "usr/lib/python3.11/os.pyc" in entries
    assert "usr/lib/python3.11/tkinter/__init__.pyc" not in entries
    assert not [p for p in entries if p.endswith(".py")]  # bytecode only


def test_kernel_modules_in_load_order(image: bytes, tmp_path: Path) -> None:
    entries = read_newc(image)
    (tmp_path / "modules").write_bytes(entries["etc/spinbox/modules"][1])
    lines = (tmp_path / "modules").read_text().splitlines()
    listed = [line for line in lines if not line.startswith("#")]
    names = [Path(p).name for p in listed]
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_pci.ko")
    assert names.index("virtio.ko") < names.index("virtio_console.ko")
    for wanted in ("virtio_blk.ko", "virtio_net.ko", "virtio-rng.ko", "erofs.ko", "overlay.ko"):
        assert wanted in names
    # What the agent's port needs comes first; the rest loads while the agent serves.
    early, deferred = boot.read_module_list(tmp_path / "modules")
    assert [Path(p).name for p in early][-1] == "virtio_console.ko"
    assert {"virtio_blk.ko", "erofs.ko", "overlay.ko"} <= {Path(p).name for p in deferred}
    for path in listed:
        assert "usr" + path in entries  # /lib is a link to usr/lib


def test_modules_for_nested_containers_load_on_demand(image: bytes) -> None:
    # Carried with modprobe's indexes for them alone, never loaded at boot.
    entries = read_newc(image)
    listing = entries["etc/spinbox/modules"][1].decode()
    kernel = default_kernel().name.removeprefix("vmlinuz-")
    modules = f"usr/lib/modules/{kernel}"
    dep = entries[f"{modules}/modules.dep"][1].decode()
    aliases = entries[f"{modules}/modules.alias"][1].decode()
    for name in ("bridge", "veth", "br_netfilter", "tun", "nf_tables", "nft_compat", "xt_MASQUERADE"):
        (path,) = [
            line.split(":")[0] for line in dep.splitlines() if line.split(":")[0].endswith(f"/{name}.ko")
        ]
        assert f"{modules}/{path}" in entries
        assert f"/{name}.ko" not in listing
    assert "alias rtnl-link-bridge bridge" in aliases
    assert "alias fs-overlay overlay" in aliases
    assert f"{modules}/modules.dep.bin" in entries  # kmod's modprobe reads only the binary indexes
    # Every module in the image is in modules.dep, and nothing else is.
    carried = {p.removeprefix(f"{modules}/") for p in entries if p.endswith(".ko")}
    assert carried == {line.split(":")[0] for line in dep.splitlines()}
    mode, target, _, _ = entries["usr/sbin/modprobe"]
    assert stat.S_ISLNK(mode) and target == b"/usr/bin/busybox"


@pytest.mark.skipif(os.geteuid() != 0, reason="the import check chroots, which needs root")
def test_a_module_left_out_fails_the_build(tmp_path: Path) -> None:
    (tmp_path / "brokeninit").mkdir()
    (tmp_path / "brokeninit" / "__init__.py").write_text("")
    (tmp_path / "brokeninit" / "main.py").write_text("import tkinter\n")  # never put in images
    config = ImageConfig(
        **{**trivial_config(tmp_path).__dict__, "entry": "brokeninit.main:main", "packages": ("brokeninit",)}
    )
    with pytest.raises(
        BuildError, match=r"python cannot import brokeninit.main: .*No module named 'tkinter'"
    ):
        build(config, tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()


def test_modules_dep_resolution(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/a.ko: kernel/c.ko kernel/b.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\nkernel/d-e.ko.xz:\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    tree = ModuleTree(tmp_path)
    assert tree.resolve(required=("a", "d_e", "ext4"), optional=("nope",)) == [
        "kernel/c.ko",
        "kernel/b.ko",
        "kernel/a.ko",
        "kernel/d-e.ko.xz",
    ]
    with pytest.raises(BuildError, match="has no module virtio_blk"):
        tree.resolve(required=("virtio_blk",), optional=())


def test_missing_modules_dep_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"apt install linux-image-cloud-amd64\) or run `depmod"):
        ModuleTree(tmp_path / "6.1.0-99-cloud-amd64").resolve()


def test_cli_errors_name_what_to_install(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mkguest_main(["--kernel-version", "0.0-none", "--output", str(tmp_path / "x.img")]) == 1
    assert "install the kernel's package (apt install linux-image-cloud-amd64" in capsys.readouterr().err
    assert mkguest_main(["--kernel", str(tmp_path / "vmlinuz-1"), "--output", str(tmp_path / "x.img")]) == 1
    assert "apt install linux-image-cloud-amd64" in capsys.readouterr().err
    assert not (tmp_path / "x.img").exists()
