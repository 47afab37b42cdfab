"""prepare_rootfs with real mkfs.erofs/mkfs.ext4 and the rootfs mounted as the guest mounts it."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guest.vminitd import upperstream as guest_stream
from spinbox.storage import LayerCache, MountSpec, PreparedRootfs, StorageError, prepare_rootfs
from tests.integration.storage.storage_trees import (
    OPAQUE,
    WHITEOUT,
    files_under,
    guest_view,
    listing,
    make_tree,
    mount,
    overlay_of,
)

UPPER_MIB = 64


async def _pieces(upper: Path) -> AsyncIterator[bytes]:
    for piece in guest_stream.pieces(upper):
        yield piece


def stream_from(upper: Path, prepared: PreparedRootfs) -> None:
    """What the guest does on ExportUpper: stream its upper directory to the host's writeback."""
    asyncio.run(prepared.writeback(_pieces(upper)))


def guest_writeback(prepared: PreparedRootfs, scratch: Path) -> None:
    """The guest, its writes done, mounts its writable layer and streams it (the test mounts it here)."""
    point = scratch / "export"
    mount(prepared.images[-1].path, point, "ext4", "ro,loop")
    try:
        stream_from(point / "upper", prepared)
    finally:
        subprocess.run(["umount", str(point)], check=True)


def base_layers(root: Path) -> list[Path]:
    """Three layers, topmost first, using whiteouts, opaque dirs, hard links, symlinks, xattrs
    (trusted.*, which tmpfs also stores on Debian 12's kernel)."""
    bottom = make_tree(
        root / "l0",
        {
            "etc/": None,
            "etc/os-release": "NAME=base\n",
            "etc/passwd": "root:x:0:0::/root:/bin/sh\n",
            "usr/lib/a.so": b"\x7fELF" + bytes(5000),
            "usr/share/doc/readme": "old docs\n",
            "var/cache/junk": "junk\n",
            "bin/sh": ("->", "busybox"),
            "bin/busybox": b"busybox" * 100,
        },
    )
    os.link(bottom / "bin/busybox", bottom / "bin/ls")
    os.chown(bottom / "etc/passwd", 1000, 1001)
    os.chmod(bottom / "etc/passwd", 0o640)
    os.setxattr(bottom / "usr/lib/a.so", "trusted.spinbox", b"label")
    middle = make_tree(
        root / "l1",
        {
            "etc/os-release": "NAME=middle\n",
            "var/cache/": "opaque",
            "var/cache/fresh": "fresh\n",
            "usr/share/doc/": None,
            "usr/share/doc/readme": WHITEOUT,
            "opt/app/run": "#!/bin/sh\n",
        },
    )
    os.chmod(middle / "opt/app/run", 0o755)
    top = make_tree(root / "l2", {"etc/passwd": WHITEOUT, "opt/app/config": "debug=1\n"})
    return [top, middle, bottom]


def empty_upper(root: Path) -> tuple[Path, Path]:
    upper, work = root / "upper", root / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    return upper, work


def writable_snapshot(root: Path) -> tuple[list[Path], Path, Path]:
    """base_layers() under an empty writable snapshot: (layers, upperdir, workdir)."""
    return (base_layers(root), *empty_upper(root))


def overlay_mount(lowers: list[Path], upper: Path | None = None, work: Path | None = None) -> MountSpec:
    options = ["index=off", "lowerdir=" + ":".join(map(str, lowers))]
    if upper is not None:
        options += [f"upperdir={upper}", f"workdir={work}"]
    return MountSpec("overlay", "overlay", "", tuple(options))


def prepare(cache: LayerCache, mounts: list[MountSpec], work_dir: Path, **kwargs: int) -> PreparedRootfs:
    return asyncio.run(prepare_rootfs("c1", mounts, work_dir, cache, UPPER_MIB, **kwargs))


def release(prepared: PreparedRootfs) -> None:
    asyncio.run(prepared.release())


def test_layers_become_erofs_disks_that_stack_like_the_snapshot(tmp_path: Path, cache: LayerCache) -> None:
    layers = base_layers(tmp_path / "snap")
    upper = make_tree(
        tmp_path / "snap/upper",
        # Names debugfs must be given quoted, when it restores the nanoseconds mkfs.ext4 -d drops.
        {
            "root/.history": "ls\n",
            "etc/os-release": WHITEOUT,
            'root/a "quoted" name': "q\n",
            "root/x y": "s\n",
        },
    )
    os.utime(upper / "root/x y", ns=(1_000_000_001, 3_000_000_000_999_999_999))  # beyond 2038: epoch bits
    (tmp_path / "snap/work").mkdir()
    prepared = prepare(cache, [overlay_mount(layers, upper, tmp_path / "snap/work")], tmp_path / "vm")
    try:
        assert [(i.serial, i.read_only) for i in prepared.images] == [
            ("sb-l0", True), ("sb-l1", True), ("sb-l2", True), ("sb-up", False),
        ]  # fmt: skip
        assert [d.serial for d in prepared.request.lowers] == ["sb-l0", "sb-l1", "sb-l2"]
        assert prepared.request.container_id == "c1"
        upper_image = prepared.images[-1].path
        assert upper_image.stat().st_blocks * 512 < upper_image.stat().st_size  # sparse
        with (
            guest_view(prepared, tmp_path / "guest") as view,
            overlay_of([upper, *layers], tmp_path / "ref") as ref,
        ):
            seen = listing(view)
            assert seen == listing(ref)
        assert "etc/os-release" not in seen and "etc/passwd" not in seen
        assert "usr/share/doc/readme" not in seen and "var/cache/junk" not in seen
        assert seen["var/cache/fresh"][3] == b"fresh\n"
        assert seen["root/.history"][3] == b"ls\n"
        assert seen["root/x y"][5] == 3_000_000_000_999_999_999
        assert seen["usr/lib/a.so"][4] == (("trusted.spinbox", b"label"),)
    finally:
        release(prepared)
    assert not prepared.directory.exists()


def test_many_layers_share_few_disks_and_look_the_same(tmp_path: Path, cache: LayerCache) -> None:
    layers = base_layers(tmp_path / "snap")
    more = [
        make_tree(tmp_path / "snap/l3", {"opt/app/config": "debug=0\n", "srv/data": "x" * 10000}),
        make_tree(tmp_path / "snap/l4", {"srv/data": WHITEOUT, "usr/": "opaque", "usr/bin/tool": "tool\n"}),
        make_tree(tmp_path / "snap/l5", {"srv/new": "new\n", "etc/": "opaque", "etc/hostname": "box\n"}),
    ]
    stack = list(reversed(more)) + layers  # six layers, topmost first
    prepared = prepare(cache, [overlay_mount(stack)], tmp_path / "vm", max_lower_devices=3)
    try:
        assert [i.serial for i in prepared.images] == ["sb-l0", "sb-l1", "sb-l2"]
        assert not prepared.request.HasField("upper")
        with guest_view(prepared, tmp_path / "guest") as view, overlay_of(stack, tmp_path / "ref") as ref:
            assert listing(view) == listing(ref)
            assert (view / "etc/hostname").exists() and not (view / "etc/os-release").exists()
            assert not (view / "usr/lib/a.so").exists()
            assert (view / "bin/ls").stat().st_ino == (view / "bin/busybox").stat().st_ino
    finally:
        release(prepared)


def test_read_only_views_and_single_layers(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache", retain=False)
    layers = base_layers(tmp_path / "snap")
    bind = MountSpec("bind", str(layers[2]), "", ("ro", "rbind"))
    prepared = prepare(cache, [bind], tmp_path / "vm")
    try:
        assert [i.serial for i in prepared.images] == ["sb-l0"]
        assert not prepared.request.HasField("upper") and not prepared.request.tmpfs_upper
        with guest_view(prepared, tmp_path / "guest") as view:
            assert listing(view) == listing(layers[2])
    finally:
        release(prepared)
    # A writable snapshot without layers: an empty lower under the writable one.
    scratch = make_tree(tmp_path / "snap/scratch", {"hello": "hi\n"})
    prepared = prepare(cache, [MountSpec("bind", str(scratch), "", ("rw", "rbind"))], tmp_path / "vm")
    try:
        assert [i.serial for i in prepared.images] == ["sb-l0", "sb-up"]
        with guest_view(prepared, tmp_path / "guest") as view:
            assert listing(view) == listing(scratch)
    finally:
        release(prepared)
    assert files_under(cache.root) == []


def test_writeback_puts_the_guests_changes_into_the_snapshot_in_overlay_format(
    tmp_path: Path, cache: LayerCache
) -> None:
    layers = base_layers(tmp_path / "snap")
    upper = make_tree(
        tmp_path / "snap/upper",
        {
            "root/.history": "ls\n",
            "root/scratch": "temp\n",
            "etc/motd": "hello\n",
            "etc/os-release": WHITEOUT,
        },
    )
    work = tmp_path / "snap/work"
    work.mkdir()
    prepared = prepare(cache, [overlay_mount(layers, upper, work)], tmp_path / "vm")
    try:
        with guest_view(prepared, tmp_path / "guest") as view:
            (view / "root/.history").write_text("ls\nreboot\n")  # changed upper file
            (view / "root/scratch").unlink()  # upper-only file: simply gone
            (view / "bin/busybox").unlink()  # lower file: a whiteout
            (view / "var/log").mkdir(parents=True)
            (view / "var/log/messages").write_bytes(os.urandom(300_000))
            os.link(view / "var/log/messages", view / "var/log/messages.1")
            (view / "usr/share/link").symlink_to("../lib/a.so")
            os.chown(view / "etc/motd", 42, 43)
            os.setxattr(view / "etc/motd", "trusted.note", b"kept")
            os.mknod(view / "fifo", stat.S_IFIFO | 0o644)
            for entry in (view / "usr/lib").iterdir():  # rm -rf, then recreate: an opaque dir
                entry.unlink()
            (view / "usr/lib").rmdir()
            (view / "usr/lib").mkdir()
            (view / "usr/lib/b.so").write_text("new lib\n")
            (view / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")  # re-created after a whiteout
            expected = listing(view)
        guest_writeback(prepared, tmp_path / "guest")
        assert not (upper / "root/scratch").exists()
        assert os.major((upper / "bin/busybox").lstat().st_rdev) == 0
        assert stat.S_ISCHR((upper / "bin/busybox").lstat().st_mode)
        assert os.getxattr(upper / "usr/lib", OPAQUE) == b"y"
        assert (upper / "var/log/messages").stat().st_ino == (upper / "var/log/messages.1").stat().st_ino
        assert (upper / "etc/motd").stat().st_uid == 42
        assert os.getxattr(upper / "etc/motd", "trusted.note") == b"kept"
        assert not any(name.startswith("trusted.overlay.origin") for name in os.listxattr(upper / "etc/motd"))
        with guest_view(prepared, tmp_path / "guest", writable=False) as ext4_view:
            pass  # the ext4 image still mounts cleanly after writeback
        del ext4_view
        # The snapshot, stacked by the host's overlayfs, now shows what the guest saw.
        with overlay_of([upper, *layers], tmp_path / "ref") as ref:
            assert listing(ref) == expected
        # A second writeback after more changes mirrors deletions of earlier additions too.
        with guest_view(prepared, tmp_path / "guest") as view:
            (view / "var/log/messages.1").unlink()
            (view / "fifo").unlink()
            expected = listing(view)
        guest_writeback(prepared, tmp_path / "guest")
        with overlay_of([upper, *layers], tmp_path / "ref") as ref:
            assert listing(ref) == expected
        assert not (upper / "fifo").exists()
    finally:
        release(prepared)


def test_second_vm_reuses_the_images_and_release_collects_them(tmp_path: Path) -> None:
    layers = base_layers(tmp_path / "snap")
    cache = LayerCache(tmp_path / "cache", retain=False)
    first = prepare(cache, [overlay_mount(layers)], tmp_path / "vm1")
    built = {i.path: i.path.stat() for i in first.images}
    second = asyncio.run(prepare_rootfs("c1", [overlay_mount(layers)], tmp_path / "vm2", cache, UPPER_MIB))
    try:
        assert [i.path for i in second.images] == [i.path for i in first.images]
        for path, before in built.items():
            assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns
        release(first)
        assert all(path.exists() for path in built)  # the second VM still uses them
    finally:
        release(second)
    assert files_under(cache.root) == []


def test_retained_images_live_as_long_as_their_layers(tmp_path: Path, cache: LayerCache) -> None:
    layers = base_layers(tmp_path / "snap")
    prepared = prepare(cache, [overlay_mount(layers)], tmp_path / "vm")
    images = [i.path for i in prepared.images]
    release(prepared)
    assert asyncio.run(cache.collect()) == []
    assert all(path.exists() for path in images)
    # containerd removes the top layer and reuses its snapshot directory for another one.
    for entry in layers[0].rglob("*"):
        if not entry.is_dir():
            entry.unlink()
    layers[0].rename(tmp_path / "gone")
    make_tree(layers[0], {"etc/": None, "etc/other": "other\n"})
    prepared = prepare(cache, [overlay_mount(layers)], tmp_path / "vm")
    try:
        assert prepared.images[0].path != images[0]  # not the stale image of the old layer
        assert [i.path for i in prepared.images][1:] == images[1:]
        with guest_view(prepared, tmp_path / "guest") as view:
            assert (view / "etc/other").exists()
        assert len(asyncio.run(cache.collect())) == 1  # the old top layer's image
    finally:
        release(prepared)
    for layer in layers:
        layer.rename(layer.with_name(layer.name + ".removed"))
    assert len(asyncio.run(cache.collect())) == 3
    assert files_under(cache.root) == []


def test_concurrent_preparers_build_each_image_once(tmp_path: Path, cache: LayerCache) -> None:
    layers = base_layers(tmp_path / "snap")

    async def many() -> list[PreparedRootfs]:
        return await asyncio.gather(
            *(
                prepare_rootfs("c1", [overlay_mount(layers)], tmp_path / f"vm{n}", cache, UPPER_MIB)
                for n in range(4)
            )
        )

    prepared = asyncio.run(many())
    try:
        paths = {tuple(i.path for i in p.images) for p in prepared}
        assert len(paths) == 1
        assert len(list(cache.images.glob("*.erofs"))) == 3
        assert files_under(cache.tmp) == []
    finally:
        for p in prepared:
            release(p)


def test_load_gives_back_the_prepared_rootfs(tmp_path: Path, cache: LayerCache) -> None:
    layers, upper, work = writable_snapshot(tmp_path / "snap")
    prepared = prepare(cache, [overlay_mount(layers, upper, work)], tmp_path / "vm")
    again = PreparedRootfs.load(tmp_path / "vm", "c1", cache)
    assert again.images == prepared.images
    assert again.request == prepared.request
    assert again.keys == prepared.keys
    release(again)
    assert not prepared.directory.exists()
    with pytest.raises(StorageError, match="no prepared rootfs for c1"):
        PreparedRootfs.load(tmp_path / "vm", "c1", cache)


def test_erofs_snapshotter_layers_are_attached_as_they_are(tmp_path: Path, cache: LayerCache) -> None:
    """containerd 2.1's erofs snapshotter: <snapshot>/layer.erofs next to <snapshot>/fs."""
    layers = base_layers(tmp_path / "src")
    snapshots = tmp_path / "snapshots"
    fs_dirs = []
    for n, layer in enumerate(layers):
        directory = snapshots / str(n + 1)
        (directory / "fs").mkdir(parents=True)
        subprocess.run(["mkfs.erofs", "--quiet", str(directory / "layer.erofs"), str(layer)], check=True)
        fs_dirs.append(directory / "fs")
    active = snapshots / "9"
    (active / "fs").mkdir(parents=True)
    (active / "work").mkdir()
    prepared = prepare(cache, [overlay_mount(fs_dirs, active / "fs", active / "work")], tmp_path / "vm")
    try:
        assert [i.path for i in prepared.images][:3] == [d.parent / "layer.erofs" for d in fs_dirs]
        assert files_under(cache.images) == []  # nothing converted
        with guest_view(prepared, tmp_path / "guest") as view, overlay_of(layers, tmp_path / "ref") as ref:
            assert listing(view) == listing(ref)
    finally:
        release(prepared)
    # A view of one committed layer is an erofs mount of its blob.
    blob = fs_dirs[0].parent / "layer.erofs"
    prepared = prepare(cache, [MountSpec("erofs", str(blob), "", ("ro", "loop"))], tmp_path / "vm")
    try:
        assert [(i.path, i.read_only) for i in prepared.images] == [(blob, True)]
    finally:
        release(prepared)
    # Too many blobs for the device budget: the bottom ones are flattened.
    prepared = prepare(cache, [overlay_mount(fs_dirs)], tmp_path / "vm", max_lower_devices=2)
    try:
        assert prepared.images[0].path == fs_dirs[0].parent / "layer.erofs"
        with guest_view(prepared, tmp_path / "guest") as view, overlay_of(layers, tmp_path / "ref") as ref:
            assert listing(view) == listing(ref)
    finally:
        release(prepared)


@pytest.mark.parametrize(
    ("mounts", "message"),
    [
        ([MountSpec("tmpfs", "tmpfs", "", ())], "mount type 'tmpfs' is not supported"),
        ([overlay_mount([Path("/nonexistent/layer"), Path("/")])], "/nonexistent/layer does not exist"),
        ([], "no rootfs mounts"),
        ([MountSpec("erofs", "/nonexistent.erofs", "", ("ro",))], "'/nonexistent.erofs' does not exist"),
    ],
)
def test_bad_mounts_are_refused_with_a_sentence(
    tmp_path: Path, cache: LayerCache, mounts: list[MountSpec], message: str
) -> None:
    with pytest.raises(StorageError, match=message):
        prepare(cache, mounts, tmp_path / "vm")
    assert files_under(tmp_path / "vm") == [] and files_under(cache.root) == []


def test_an_upper_too_big_for_the_writable_layer_leaves_nothing(tmp_path: Path, cache: LayerCache) -> None:
    layers = base_layers(tmp_path / "snap")
    upper = make_tree(tmp_path / "snap/upper", {"big": os.urandom(3 * 1024 * 1024)})
    (tmp_path / "snap/work").mkdir()
    mounts = [overlay_mount(layers, upper, tmp_path / "snap/work")]
    with pytest.raises(StorageError, match="does not fit in a 2 MiB writable layer"):
        asyncio.run(
            prepare_rootfs("c1", mounts, tmp_path / "vm", LayerCache(tmp_path / "c", retain=False), 2)
        )
    assert files_under(tmp_path / "vm") == [] and files_under(tmp_path / "c") == []


def test_a_full_cache_disk_is_named_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        layer = make_tree(tmp_path / "snap/l0", {"big": os.urandom(2 * 1024 * 1024)})
        cache = LayerCache(root / "cache")
        with pytest.raises(StorageError, match=f"no space left on the file system holding {root}"):
            prepare(cache, [MountSpec("bind", str(layer), "", ("ro", "rbind"))], tmp_path / "vm")
        assert files_under(root) == []
        assert files_under(tmp_path / "vm") == []
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_writeback_of_a_running_guest_streams_its_mounted_upper(tmp_path: Path, cache: LayerCache) -> None:
    """SyncRootfs while the guest still has the file system mounted; the image is never read by the host."""
    layers, upper, work = writable_snapshot(tmp_path / "snap")
    prepared = prepare(cache, [overlay_mount(layers, upper, work)], tmp_path / "vm")
    try:
        image = prepared.images[-1].path
        before = image.read_bytes()
        with guest_view(prepared, tmp_path / "guest") as view:
            (view / "etc/new").write_text("written while running\n")
            (view / "opt/app/config").unlink()
            stream_from(tmp_path / "guest/upper/upper", prepared)
            expected = listing(view)
        assert before != image.read_bytes()  # only the guest wrote it
        with overlay_of([upper, *layers], tmp_path / "ref") as ref:
            assert listing(ref) == expected
        assert files_under(prepared.directory) == ["rootfs.json", "upper.ext4"]
    finally:
        release(prepared)


def test_a_zero_size_upper_is_a_tmpfs_in_the_guest(tmp_path: Path, cache: LayerCache) -> None:
    layers, upper, work = writable_snapshot(tmp_path / "snap")
    mounts = [overlay_mount(layers, upper, work)]
    prepared = asyncio.run(prepare_rootfs("c1", mounts, tmp_path / "vm", cache, 0))
    try:
        assert prepared.request.tmpfs_upper and not prepared.request.HasField("upper")
        assert all(image.read_only for image in prepared.images)
        assert not prepared.writable  # nothing to write back
    finally:
        release(prepared)


def test_a_cancelled_prepare_gives_everything_back(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "snap/l1", {"etc/hostname": "box\n"})
    layer = make_tree(tmp_path / "snap/l0", {f"f{n}": os.urandom(100_000) for n in range(100)})
    upper, work = empty_upper(tmp_path / "snap")
    cache = LayerCache(tmp_path / "cache", retain=False)

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(
            prepare_rootfs("c1", [overlay_mount([top, layer], upper, work)], tmp_path / "vm", cache, 64)
        )
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            prepared = await task
        except asyncio.CancelledError:
            return
        await prepared.release()  # it finished before the cancellation arrived

    asyncio.run(cancel_midway())
    assert files_under(tmp_path / "vm") == []
    assert files_under(cache.root) == []


def test_builders_in_separate_processes_share_one_image(tmp_path: Path, cache: LayerCache) -> None:
    layers = base_layers(tmp_path / "snap")
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from spinbox.storage import LayerCache, MountSpec, prepare_rootfs\n"
        "mount = MountSpec('overlay', 'overlay', '', ('lowerdir=' + sys.argv[2],))\n"
        "cache = LayerCache(Path(sys.argv[1]))\n"
        "p = asyncio.run(prepare_rootfs('c1', [mount], Path(sys.argv[3]), cache, 64))\n"
        "print(' '.join(f'{i.path}:{i.path.stat().st_ino}' for i in p.images))\n"
    )
    lowerdir = ":".join(map(str, layers))
    top = Path(__file__).resolve().parents[3]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(cache.root), lowerdir, str(tmp_path / f"vm{n}")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=top,
        )
        for n in range(3)
    ]
    outputs = {proc.communicate()[0] for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(outputs) == 1  # the same images, same inodes: built once
    assert len(list(cache.images.glob("*.erofs"))) == 3
    for n in range(3):
        release(PreparedRootfs.load(tmp_path / f"vm{n}", "c1", cache))


def test_a_second_prepare_of_the_same_container_is_refused(tmp_path: Path, cache: LayerCache) -> None:
    layers = base_layers(tmp_path / "snap")
    prepared = prepare(cache, [overlay_mount(layers)], tmp_path / "vm")
    try:
        with pytest.raises(StorageError, match="a rootfs for c1 is already prepared"):
            prepare(cache, [overlay_mount(layers)], tmp_path / "vm")
        assert prepared.directory.is_dir()
    finally:
        release(prepared)


def test_a_full_snapshot_disk_fails_writeback_with_its_name(tmp_path: Path, cache: LayerCache) -> None:
    layers = base_layers(tmp_path / "snap")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        upper, work = empty_upper(small)
        prepared = prepare(cache, [overlay_mount(layers, upper, work)], tmp_path / "vm")
        try:
            with guest_view(prepared, tmp_path / "guest") as view:
                (view / "big").write_bytes(os.urandom(2 * 1024 * 1024))
            with pytest.raises(StorageError, match=f"no space left on the file system holding {upper}"):
                guest_writeback(prepared, tmp_path / "guest")
            assert files_under(small) == []  # nothing half-written is left
            assert files_under(prepared.directory) == ["rootfs.json", "upper.ext4"]
        finally:
            release(prepared)
    finally:
        subprocess.run(["umount", str(small)], check=True)
