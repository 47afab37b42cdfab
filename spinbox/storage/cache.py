"""LayerCache: EROFS images of layer directories, shared by every VM that uses them.

Layout under the cache root:

    images/<key>.erofs   the image
    images/<key>.json    what it was built from (path and identity of each source)
    refs/<key>/<holder>  one file per prepared rootfs using it; holds that rootfs's work dir
    locks/<key>.lock     flock()ed by whoever builds, references or removes <key>
    tmp/                 images being built and scratch mount points

A key is a hash of the conversion format and of each source's path and
identity (device, inode, ctime), so a snapshot id that containerd reuses for
a new layer gets a new image instead of a stale one. Images are built into a
temporary file and renamed into place; builders of the same key serialise on
its lock file, so the second one finds the first one's image.

An entry is referenced by every prepared rootfs using it (a file under
refs/, alive while that rootfs's work directory exists) and, when `retain` is
set, by its source layers for as long as they exist unchanged: the next VM of
the same image then starts without converting anything. collect(), which
every release also runs, removes each entry with no reference left and
whatever a crash left in tmp/; spinboxd runs it at start as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from spinbox.storage.errors import StorageError
from spinbox.storage.mounts import Layer, LayerKind
from spinbox.storage.system import os_error, remove_file, remove_tree

# Bump when the conversion changes, so that old images are not reused.
FORMAT = 1


@dataclass(frozen=True)
class SourceIdentity:
    """Where a layer is and which incarnation of that path it is."""

    path: str
    kind: str
    dev: int
    ino: int
    ctime_ns: int
    size: int

    @classmethod
    def of(cls, layer: Layer) -> SourceIdentity:
        try:
            st = os.stat(layer.path)
        except OSError as exc:
            raise StorageError(f"the layer {layer.path} cannot be read: {exc.strerror}") from exc
        size = st.st_size if layer.kind is LayerKind.EROFS else 0
        return cls(str(layer.path), layer.kind.value, st.st_dev, st.st_ino, st.st_ctime_ns, size)

    def still_there(self) -> bool:
        try:
            return SourceIdentity.of(Layer(Path(self.path), LayerKind(self.kind))) == self
        except StorageError:
            return False


def layer_key(identity: SourceIdentity) -> str:
    return _digest(["layer", FORMAT, asdict(identity)])


def chain_key(keys: Sequence[str]) -> str:
    """The key of one image flattened from layers with these keys (topmost first)."""
    return _digest(["chain", FORMAT, list(keys)])


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Holder:
    """A prepared rootfs holding cache references; alive while its work dir exists."""

    name: str
    work_dir: Path

    @classmethod
    def for_work_dir(cls, work_dir: Path) -> Holder:
        return cls(hashlib.sha256(str(work_dir).encode()).hexdigest()[:24], work_dir)


class LayerCache:
    def __init__(self, root: Path = Path("/var/lib/spinbox/layers"), retain: bool = True) -> None:
        self.root = root
        self.retain = retain
        self.images = root / "images"
        self.refs = root / "refs"
        self.locks = root / "locks"
        self.tmp = root / "tmp"

    def _ensure_dirs(self) -> None:
        try:
            for path in (self.images, self.refs, self.locks, self.tmp):
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise os_error(exc, "creating the layer cache") from exc

    def image_path(self, key: str) -> Path:
        return self.images / f"{key}.erofs"

    @contextlib.contextmanager
    def locked(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the key's lock; yields False when not blocking and someone else holds it."""
        path = self.locks / f"{key}.lock"
        self.locks.mkdir(parents=True, exist_ok=True, mode=0o700)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(fd).st_ino:
                break
            # collect() removed this lock file while we waited for it: take the new one.
            os.close(fd)
        try:
            yield True
        finally:
            os.close(fd)

    def acquire(
        self, key: str, sources: Sequence[SourceIdentity], holder: Holder, build: Callable[[Path], None]
    ) -> Path:
        """The image for `key`, built with `build(temp_path)` unless present; referenced by `holder`.

        Blocking: run it in an executor thread.
        """
        self._ensure_dirs()
        image = self.image_path(key)
        with self.locked(key):
            if not image.exists():
                temp = self.tmp / f"{key}.{uuid.uuid4().hex[:8]}.erofs"
                try:
                    build(temp)
                    meta = {"format": FORMAT, "sources": [asdict(s) for s in sources]}
                    meta_temp = temp.with_suffix(".json")
                    meta_temp.write_text(json.dumps(meta))
                    os.rename(meta_temp, self.images / f"{key}.json")
                    os.rename(temp, image)
                except OSError as exc:
                    remove_file(self.locks / f"{key}.lock")
                    raise os_error(exc, f"storing the layer image {image}") from exc
                except BaseException:
                    remove_file(self.locks / f"{key}.lock")
                    raise
                finally:
                    remove_file(temp)
                    remove_file(temp.with_suffix(".json"))
            try:
                refs = self.refs / key
                refs.mkdir(exist_ok=True)
                (refs / holder.name).write_text(str(holder.work_dir))
            except OSError as exc:
                raise os_error(exc, f"referencing the layer image {image}") from exc
        return image

    def release(self, keys: Sequence[str], holder: Holder) -> None:
        """Drop the holder's references, then remove every entry nothing references any more
        (also those whose layers containerd removed since the last collection)."""
        for key in keys:
            with self.locked(key):
                remove_file(self.refs / key / holder.name)
                with contextlib.suppress(OSError):
                    (self.refs / key).rmdir()
        self.collect_sync()

    def referenced(self, key: str) -> bool:
        """Whether a live rootfs or (with retain) a still-existing source references the entry."""
        refs = self.refs / key
        if refs.is_dir():
            for ref in refs.iterdir():
                try:
                    work_dir = Path(ref.read_text())
                except OSError:
                    continue
                if work_dir.is_dir():
                    return True
                remove_file(ref)  # its rootfs is gone without releasing: a crash or reboot
        if not self.retain:
            return False
        try:
            meta = json.loads((self.images / f"{key}.json").read_text())
        except (OSError, ValueError):
            return False
        if meta.get("format") != FORMAT:
            return False
        sources = meta["sources"]
        return bool(sources) and all(SourceIdentity(**s).still_there() for s in sources)

    def _collect_key(self, key: str) -> bool:
        with self.locked(key, blocking=False) as mine:
            if not mine or self.referenced(key):
                return False
            remove_file(self.image_path(key))
            remove_file(self.images / f"{key}.json")
            shutil.rmtree(self.refs / key, ignore_errors=True)
            remove_file(self.locks / f"{key}.lock")
            return True

    def collect_sync(self) -> list[str]:
        """Remove unreferenced entries and leftovers of interrupted builds; returns the removed keys."""
        if not self.root.exists():
            return []
        keys: set[str] = set()
        for directory, suffixes in ((self.images, (".erofs", ".json")), (self.locks, (".lock",))):
            if directory.is_dir():
                for entry in directory.iterdir():
                    if entry.suffix in suffixes:
                        keys.add(entry.name.split(".", 1)[0])
        if self.refs.is_dir():
            keys.update(entry.name for entry in self.refs.iterdir())
        removed = sorted(key for key in keys if self._collect_key(key))
        self._collect_tmp()
        return removed

    def _collect_tmp(self) -> None:
        """Remove scratch files whose builder is gone (its key's lock is free)."""
        if not self.tmp.is_dir():
            return
        for entry in self.tmp.iterdir():
            key = entry.name.split(".", 1)[0]
            with self.locked(key, blocking=False) as mine:
                if not mine:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    remove_tree(entry)
                else:
                    remove_file(entry)
                remove_file(self.locks / f"{key}.lock")

    async def collect(self) -> list[str]:
        return await asyncio.to_thread(self.collect_sync)
