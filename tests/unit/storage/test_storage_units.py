"""Mount parsing, cache keys, locks and layer grouping (no mounts, no mkfs)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from spinbox.storage import LayerCache, MountSpec, StorageError
from spinbox.storage.cache import Holder, SourceIdentity, chain_key, layer_key
from spinbox.storage.mounts import Layer, LayerKind, parse_mounts, split_lowerdir
from spinbox.storage.rootfs import group_layers, lower_serial


def dirs(root: Path, *names: str) -> list[Path]:
    paths = [root / name for name in names]
    for path in paths:
        path.mkdir(parents=True)
    return paths


def test_split_lowerdir_honours_escaped_colons() -> None:
    assert split_lowerdir("/a:/b:/c") == ["/a", "/b", "/c"]
    assert split_lowerdir(r"/a\:x:/b") == ["/a:x", "/b"]
    assert split_lowerdir("/a") == ["/a"]


def test_overlay_with_upper_is_a_writable_stack(tmp_path: Path) -> None:
    top, bottom, upper, work = dirs(tmp_path, "2/fs", "1/fs", "3/fs", "3/work")
    options = ("index=off", f"workdir={work}", f"upperdir={upper}", f"lowerdir={top}:{bottom}")
    spec = MountSpec("overlay", "overlay", "", options)
    source = parse_mounts([spec])
    assert source.lowers == (Layer(top, LayerKind.DIRECTORY), Layer(bottom, LayerKind.DIRECTORY))
    assert (source.upper, source.work) == (upper, work)


def test_lowerdir_plus_options_append_in_order(tmp_path: Path) -> None:
    a, b = dirs(tmp_path, "a", "b")
    source = parse_mounts([MountSpec("overlay", "overlay", "", (f"lowerdir+={a}", f"lowerdir+={b}"))])
    assert [layer.path for layer in source.lowers] == [a, b]


def test_bind_mounts(tmp_path: Path) -> None:
    (layer,) = dirs(tmp_path, "fs")
    ro = parse_mounts([MountSpec("bind", str(layer), "", ("ro", "rbind"))])
    assert ro.lowers == (Layer(layer, LayerKind.DIRECTORY),) and ro.upper is None
    rw = parse_mounts([MountSpec("bind", str(layer), "", ("rw", "rbind"))])
    assert rw.lowers == () and rw.upper == layer


def test_erofs_snapshotter_fs_dirs_mean_their_layer_blobs(tmp_path: Path) -> None:
    fs1, fs2 = dirs(tmp_path, "snapshots/1/fs", "snapshots/2/fs")
    for fs in (fs1, fs2):
        (fs.parent / "layer.erofs").write_bytes(b"")
    source = parse_mounts([MountSpec("overlay", "overlay", "", (f"lowerdir={fs2}:{fs1}",))])
    assert source.lowers == (
        Layer(fs2.parent / "layer.erofs", LayerKind.EROFS),
        Layer(fs1.parent / "layer.erofs", LayerKind.EROFS),
    )
    view = parse_mounts([MountSpec("erofs", str(fs1.parent / "layer.erofs"), "", ("ro", "loop"))])
    assert view.lowers == (Layer(fs1.parent / "layer.erofs", LayerKind.EROFS),) and view.upper is None


def test_mount_manager_templates(tmp_path: Path) -> None:
    blobs = [tmp_path / f"{n}.erofs" for n in range(4)]
    for blob in blobs:
        blob.write_bytes(b"")
    upper, work = dirs(tmp_path, "fs", "work")
    devices = tuple(f"device={blob}" for blob in reversed(blobs[1:]))  # bottom first
    overlay = (f"workdir={work}", f"upperdir={upper}", "lowerdir={{ overlay 0 1 }}")
    mounts = [
        MountSpec("erofs", str(blobs[0]), "", ("ro", "loop")),
        MountSpec("erofs", str(tmp_path / "fsmeta"), "", ("ro", "loop", *devices)),
        MountSpec("format/mkdir/overlay", "overlay", "", overlay),
    ]
    source = parse_mounts(mounts)
    assert [layer.path for layer in source.lowers] == blobs
    assert source.upper == upper
    single = parse_mounts([mounts[0], MountSpec("format/bind", "{{ mount 0 }}", "", ("ro", "rbind"))])
    assert [layer.path for layer in single.lowers] == [blobs[0]]


@pytest.mark.parametrize(
    ("mounts", "message"),
    [
        ([], "no rootfs mounts"),
        ([MountSpec("tmpfs", "tmpfs", "", ())], "mount type 'tmpfs' is not supported"),
        ([MountSpec("overlay", "overlay", "", ("ro",))], "no lowerdir"),
        ([MountSpec("overlay", "overlay", "", ("lowerdir=relative/path",))], "not an absolute path"),
        ([MountSpec("overlay", "overlay", "", ("lowerdir=/nonexistent",))], "/nonexistent does not exist"),
        ([MountSpec("overlay", "overlay", "", ("lowerdir=/", "upperdir=/"))], "without a workdir"),
        ([MountSpec("bind", "/nonexistent", "", ("ro",))], "does not exist or is not a directory"),
        ([MountSpec("overlay", "overlay", "", ("lowerdir={{ mount 3 }}",))], "names mount 3"),
        ([MountSpec("mkfs/ext4", "/x", "", ()), MountSpec("bind", "/", "", ())], "'mkfs/ext4' mount before"),
    ],
)
def test_bad_mounts_get_a_sentence(mounts: list[MountSpec], message: str) -> None:
    with pytest.raises(StorageError, match=message):
        parse_mounts(mounts)


def test_group_layers_keeps_the_top_separate_and_flattens_the_bottom() -> None:
    assert group_layers(0, 4) == (0, 0)
    assert group_layers(4, 4) == (4, 0)
    assert group_layers(5, 4) == (3, 2)
    assert group_layers(40, 4) == (3, 37)
    assert group_layers(3, 2) == (1, 2)
    with pytest.raises(StorageError, match="at least 2"):
        group_layers(3, 1)


def test_serials_fit_virtio_blk() -> None:
    assert lower_serial(0) == "sb-l0"
    assert all(len(lower_serial(n)) <= 20 for n in range(1000))


def test_keys_follow_the_layers_identity(tmp_path: Path) -> None:
    (layer,) = dirs(tmp_path, "fs")
    first = SourceIdentity.of(Layer(layer, LayerKind.DIRECTORY))
    assert layer_key(first) == layer_key(SourceIdentity.of(Layer(layer, LayerKind.DIRECTORY)))
    assert first.still_there()
    # The same path recreated (a reused snapshot id) is a different layer.
    layer.rename(tmp_path / "old")
    layer.mkdir()
    second = SourceIdentity.of(Layer(layer, LayerKind.DIRECTORY))
    assert layer_key(first) != layer_key(second)
    assert not first.still_there()
    assert chain_key(["a", "b"]) != chain_key(["b", "a"])
    assert len(layer_key(second)) == 32


def test_lock_excludes_other_holders_and_survives_removal(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache")
    cache.locks.mkdir(parents=True)
    with cache.locked("k") as mine:
        assert mine
        with cache.locked("k", blocking=False) as other:
            assert not other
    entered = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with cache.locked("k"):
            entered.set()
            release.wait(10)
            os.unlink(cache.locks / "k.lock")  # as collect() does

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(10)
    release.set()
    with cache.locked("k") as mine:  # waits, then takes the fresh lock file
        assert mine
        assert (cache.locks / "k.lock").exists()
    thread.join()


def test_references_die_with_their_work_dir(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache", retain=False)
    work = tmp_path / "vm"
    work.mkdir()
    image = cache.acquire("k", [], Holder.for_work_dir(work), lambda temp: temp.write_bytes(b"image"))
    assert image.read_bytes() == b"image"
    assert cache.collect_sync() == []
    work.rmdir()  # the VM went away without releasing (a crash)
    assert cache.collect_sync() == ["k"]
    assert not image.exists()


def test_a_full_host_file_system_is_named_as_such_when_the_upper_image_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spinbox.storage import upper

    def mkfs_out_of_space(*args: object, **kwargs: object) -> None:
        raise StorageError("creating the writable layer failed: no space left on the file system holding x")

    monkeypatch.setattr(upper, "run", mkfs_out_of_space)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    image = tmp_path / "rootfs-c1" / "upper.img"
    image.parent.mkdir()

    class Full:
        f_bavail, f_frsize = 3, 4096

    real_statvfs = os.statvfs
    monkeypatch.setattr(
        os, "statvfs", lambda path: Full() if Path(path) == image.parent else real_statvfs(path)
    )
    with pytest.raises(StorageError, match=f"no space left on the file system holding {image.parent}$"):
        upper.create_upper_image(image, 64, snapshot, tmp_path / "rootfs-c1")
    assert not image.exists()
    # With room on the host, it is the layer that is too small.
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    with pytest.raises(StorageError, match="does not fit in a 64 MiB writable layer"):
        upper.create_upper_image(image, 64, snapshot, tmp_path / "rootfs-c1")
