"""Building EROFS images of layer directories with mkfs.erofs (erofs-utils 1.5+).

Images keep what overlayfs needs from a layer: ownership, modes, per-file
modification times, extended attributes (so `trusted.overlay.opaque` dirs
stay opaque) and whiteouts (character devices 0:0). Data is stored
uncompressed: a guest under TCG pays dearly for decompression, and the host
page cache shares the image between VMs anyway.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from spinbox.storage.mounts import Layer, LayerKind
from spinbox.storage.system import mounted, run


def mkfs_erofs_argv(image: Path, source: Path) -> list[str]:
    return [
        "mkfs.erofs",
        "--quiet",
        "--preserve-mtime",
        str(image), str(source),
    ]  # fmt: skip


def build_image(image: Path, source: Path) -> None:
    """Write an EROFS image of the directory `source` to `image`."""
    run(mkfs_erofs_argv(image, source), f"converting the layer {source} to EROFS", space_on=image)


def build_empty_image(image: Path) -> None:
    empty = image.with_name(image.name + ".d")
    empty.mkdir(mode=0o755)
    try:
        build_image(image, empty)
    finally:
        empty.rmdir()


def build_flattened_image(image: Path, layers: Sequence[Layer], scratch_root: Path) -> None:
    """Write one EROFS image of the overlay of `layers` (topmost first, at least two).

    The layers are stacked with a read-only overlay mount on the host and the
    merged view is converted: overlayfs itself applies whiteouts and opaque
    directories, so the image holds exactly what the guest would have seen.
    The group must be the bottom of the image: the merged view has no
    whiteouts left to hide anything further below.
    """
    scratch = scratch_root / f"{image.name.split('.', 1)[0]}.{uuid.uuid4().hex[:8]}.d"
    scratch.mkdir(mode=0o700)
    try:
        with contextlib.ExitStack() as stack:
            names: list[str] = []
            for index, layer in enumerate(layers):
                name = str(index)
                if layer.kind is LayerKind.EROFS:
                    target = scratch / f"m{index}"
                    target.mkdir()
                    stack.enter_context(
                        mounted(
                            layer.path, target, "erofs", ("ro", "loop"), f"mounting the layer {layer.path}"
                        )
                    )
                    (scratch / name).symlink_to(target)
                else:
                    (scratch / name).symlink_to(layer.path)
                names.append(name)
            merged = scratch / "merged"
            merged.mkdir()
            options = ("ro", f"lowerdir={':'.join(names)}")
            stack.enter_context(
                mounted("overlay", merged, "overlay", options, "stacking layers to flatten them", cwd=scratch)
            )
            build_image(image, merged)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
