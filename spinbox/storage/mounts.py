"""containerd rootfs mounts → the layers they stack.

A snapshotter describes a container's root file system as a list of mounts.
This module reads the shapes the overlayfs and erofs snapshotters produce and
returns what spinbox needs from them: the read-only layers (topmost first),
and the writable upper directory, if any. It touches the file system only to
tell an erofs snapshotter's layer directory from a plain one.

Shapes understood:

- `overlay` with `lowerdir=a:b:c` (topmost first; also `lowerdir+=`), and
  `upperdir=`/`workdir=` for a writable snapshot (overlayfs snapshotter,
  containerd 1.6-2.x; erofs snapshotter 2.1, whose lower directories are
  `<snapshot>/fs` mount points next to `<snapshot>/layer.erofs`).
- `bind` of a directory: `ro` is a single read-only layer, `rw` a writable
  snapshot without layers.
- `erofs` with a file source (`ro,loop`): one layer that already is EROFS.
- containerd's mount-manager lists (2.2+): `erofs` mounts followed by an
  `overlay` (or `format/overlay`, `format/mkdir/overlay`, `format/bind`)
  whose `lowerdir` names them with `{{ mount N }}` / `{{ overlay A B }}`; an
  `erofs` metadata image with `device=` options stands for those layer blobs.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from spinbox.mounts import MountSpec
from spinbox.storage.errors import StorageError

# The file the erofs snapshotter keeps next to a committed layer's `fs` dir.
EROFS_LAYER_BLOB = "layer.erofs"

_OVERLAY_TYPES = ("overlay", "format/overlay", "format/mkdir/overlay")
_BIND_TYPES = ("bind", "rbind", "format/bind")
_TEMPLATE = re.compile(r"^\{\{\s*(mount|overlay)\s+(\d+)(?:\s+(\d+))?\s*\}\}(.*)$")


class LayerKind(enum.Enum):
    DIRECTORY = "directory"  # an unpacked layer, overlayfs format (whiteouts, opaque xattrs)
    EROFS = "erofs"  # a file that already is an EROFS image of such a layer


@dataclass(frozen=True)
class Layer:
    path: Path
    kind: LayerKind


@dataclass(frozen=True)
class RootfsSource:
    """What a container's rootfs is made of, as the snapshotter left it on the host."""

    lowers: tuple[Layer, ...]  # topmost first
    upper: Path | None  # the snapshot's writable directory; None: read-only rootfs
    work: Path | None


def split_lowerdir(value: str) -> list[str]:
    """Split an overlay `lowerdir` value at unescaped colons (`\\:` is a literal colon)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            current.append(next(chars, "\\"))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _options(spec: MountSpec) -> tuple[dict[str, str], list[str], set[str]]:
    """Key=value options (last wins), the lowerdir+ list in order, and the flags."""
    values: dict[str, str] = {}
    appended: list[str] = []
    flags: set[str] = set()
    for option in spec.options:
        key, sep, value = option.partition("=")
        if key == "lowerdir+":
            appended.append(value)
        elif sep:
            values[key] = value
        else:
            flags.add(option)
    return values, appended, flags


def _directory_layer(path_text: str) -> Layer:
    if not path_text:
        raise StorageError("an overlay mount names an empty lower directory")
    path = Path(path_text)
    if not path.is_absolute():
        raise StorageError(f"the lower directory {path_text!r} is not an absolute path")
    blob = path.parent / EROFS_LAYER_BLOB
    if path.name == "fs" and blob.is_file():
        return Layer(blob, LayerKind.EROFS)
    if not path.is_dir():
        raise StorageError(f"the lower directory {path} does not exist or is not a directory")
    return Layer(path, LayerKind.DIRECTORY)


def _erofs_layers(spec: MountSpec) -> list[Layer]:
    """The layers of an `erofs` mount, topmost first."""
    devices = [o.partition("=")[2] for o in spec.options if o.startswith("device=")]
    if devices:
        # A merged metadata image: its devices are the layer blobs, bottom first.
        return [_erofs_file(d) for d in reversed(devices)]
    return [_erofs_file(spec.source)]


def _erofs_file(source: str) -> Layer:
    path = Path(source)
    if not path.is_absolute() or not path.is_file():
        raise StorageError(f"the EROFS layer {source!r} does not exist or is not a file")
    return Layer(path, LayerKind.EROFS)


def _path_option(values: dict[str, str], key: str) -> Path | None:
    text = values.get(key)
    if text is None:
        return None
    path = Path(text)
    if not path.is_absolute():
        raise StorageError(f"the overlay {key} {text!r} is not an absolute path")
    if not path.is_dir():
        raise StorageError(f"the overlay {key} {path} does not exist or is not a directory")
    return path


def _expand_templates(entries: list[str], earlier: list[list[Layer]]) -> list[Layer]:
    """Resolve lowerdir entries, with `{{ mount N }}` / `{{ overlay A B }}` templates."""
    layers: list[Layer] = []
    for entry in entries:
        match = _TEMPLATE.match(entry)
        if match is None:
            layers.append(_directory_layer(entry))
            continue
        kind, first_text, last_text, rest = match.groups()
        if rest:
            raise StorageError(f"the lower directory {entry!r} points inside a mount, which is not supported")
        first = int(first_text)
        last = int(last_text) if last_text is not None else first
        if kind == "mount" and last_text is not None:
            raise StorageError(f"the mount template {entry!r} takes one index")
        step = 1 if last >= first else -1
        for index in range(first, last + step, step):
            if index >= len(earlier):
                raise StorageError(f"the mount template {entry!r} names mount {index}, which is not there")
            layers.extend(earlier[index])
    return layers


def parse_mounts(mounts: list[MountSpec]) -> RootfsSource:
    """The layers and writable directory described by containerd's rootfs mounts."""
    if not mounts:
        raise StorageError("the container has no rootfs mounts")
    earlier: list[list[Layer]] = []
    for index, spec in enumerate(mounts):
        last = index == len(mounts) - 1
        if spec.type == "erofs" or spec.type == "format/erofs":
            earlier.append(_erofs_layers(spec))
            if last:
                layers = [layer for group in earlier for layer in group]
                if len(mounts) > 1:
                    raise StorageError("several EROFS mounts without an overlay to stack them")
                return RootfsSource(tuple(layers), None, None)
            continue
        if not last:
            raise StorageError(
                f"a {spec.type!r} mount before the last one is not supported"
                " (only EROFS layers may precede the overlay)"
            )
        if spec.type in _OVERLAY_TYPES:
            values, appended, flags = _options(spec)
            if "userxattr" in flags:
                raise StorageError(
                    "overlay layers marked with user.overlay xattrs (userxattr) are not supported"
                )
            entries = split_lowerdir(values["lowerdir"]) if "lowerdir" in values else []
            entries += appended
            if not entries:
                raise StorageError("the overlay mount has no lowerdir option")
            lowers = _expand_templates(entries, earlier)
            upper = _path_option(values, "upperdir")
            work = _path_option(values, "workdir")
            if (upper is None) != (work is None):
                raise StorageError("the overlay mount has an upperdir without a workdir, or the reverse")
            return RootfsSource(tuple(lowers), upper, work)
        if spec.type in _BIND_TYPES:
            _, _, flags = _options(spec)
            if _TEMPLATE.match(spec.source):
                return RootfsSource(tuple(_expand_templates([spec.source], earlier)), None, None)
            source = Path(spec.source)
            if not source.is_absolute() or not source.is_dir():
                raise StorageError(
                    f"the bind mount source {spec.source!r} does not exist or is not a directory"
                )
            if "ro" in flags:
                return RootfsSource((Layer(source, LayerKind.DIRECTORY),), None, None)
            return RootfsSource((), source, None)
        raise StorageError(
            f"the rootfs mount type {spec.type!r} is not supported"
            " (spinbox takes overlay, bind and erofs mounts from the overlayfs or erofs snapshotter)"
        )
    raise AssertionError("unreachable")
