"""Helpers for the storage tests: layer trees in overlay format, tree listings, guest-style mounts."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from spinbox.storage import PreparedRootfs

WHITEOUT = object()  # a deleted name: character device 0:0
OPAQUE = "trusted.overlay.opaque"

Entry = str | bytes | object | dict[str, object]


def make_tree(root: Path, entries: Mapping[str, object]) -> Path:
    """Create files from {path: content}: str/bytes → file, "dir/" key → directory,
    WHITEOUT → whiteout, ("->", target) → symlink, ("opaque",) on a "dir/" → opaque directory."""
    root.mkdir(parents=True, exist_ok=True)
    for name, value in entries.items():
        path = root / name.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
            if value == "opaque":
                os.setxattr(path, OPAQUE, b"y")
        elif value is WHITEOUT:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        elif isinstance(value, tuple) and value[0] == "->":
            path.symlink_to(value[1])
        elif isinstance(value, bytes):
            path.write_bytes(value)
        else:
            path.write_text(str(value))
    return root


def listing(root: Path, skip: Sequence[str] = ()) -> dict[str, tuple[object, ...]]:
    """Everything a user sees of a tree: type, mode, owner, size, content, target, device, xattrs, mtime."""
    result: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if rel in skip:
                continue
            st = os.lstat(path)
            xattrs = tuple(
                sorted(
                    (k, os.getxattr(path, k, follow_symlinks=False))
                    for k in os.listxattr(path, follow_symlinks=False)
                )
            )
            if stat.S_ISREG(st.st_mode):
                detail: object = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                detail = None
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            result[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, detail, xattrs, mtime)
        dirs[:] = [d for d in dirs if str((Path(directory) / d).relative_to(root)) not in skip]
    return result


def mount(source: str | Path, target: Path, fstype: str, options: str, cwd: Path | None = None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", fstype, "-o", options, str(source), str(target)], check=True, cwd=cwd)


@contextlib.contextmanager
def overlay_of(layers: Sequence[Path], target: Path) -> Iterator[Path]:
    """A read-only overlay of directories (topmost first): the reference view."""
    if len(layers) == 1:
        mount(layers[0], target, "none", "bind,ro")
    else:
        mount("overlay", target, "overlay", "ro,lowerdir=" + ":".join(str(p) for p in layers))
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@contextlib.contextmanager
def guest_view(prepared: PreparedRootfs, scratch: Path, writable: bool = True) -> Iterator[Path]:
    """Mount the rootfs exactly as the guest does, reading only prepared.request and the disks by serial."""
    by_serial = {image.serial: image.path for image in prepared.images}
    request = prepared.request
    mounted: list[Path] = []
    try:
        lowers = []
        for index, device in enumerate(request.lowers):
            assert device.fstype == "erofs" and device.read_only
            target = scratch / f"lower{index}"
            mount(by_serial[device.serial], target, "erofs", "ro,loop")
            mounted.append(target)
            lowers.append(target / device.subdir if device.subdir else target)
        merged = scratch / "merged"
        if request.HasField("upper"):
            assert request.upper.fstype == "ext4" and not request.upper.read_only
            up = scratch / "upper"
            mount(by_serial[request.upper.serial], up, "ext4", "rw,loop" if writable else "ro,loop")
            mounted.append(up)
            options = f"lowerdir={':'.join(map(str, lowers))},upperdir={up}/upper,workdir={up}/work"
            if not writable:
                options = f"ro,lowerdir={up}/upper:{':'.join(map(str, lowers))}"
            mount("overlay", merged, "overlay", options)
        elif len(lowers) == 1:
            mount(lowers[0], merged, "none", "bind,ro")
        else:
            mount("overlay", merged, "overlay", f"ro,lowerdir={':'.join(map(str, lowers))}")
        mounted.append(merged)
        yield merged
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", str(target)], check=True)


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as file:
        return [line.split()[1] for line in file if line.split()[1].startswith(str(path))]


def loops_on(path: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"], capture_output=True, text=True
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip().startswith(str(path))]


def files_under(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())
