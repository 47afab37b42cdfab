"""prepare_rootfs: containerd rootfs mounts → block images for a VM and the guest's mount request.

Read-only layers become EROFS images, attached read-only over virtio-blk:
a layer directory (overlayfs snapshotter) is converted once and cached in
the LayerCache; a layer that already is an EROFS blob (erofs snapshotter) is
attached as it is. The writable layer is a sparse ext4 image in the rootfs's work
directory (so that directory belongs on a disk, not on a tmpfs), seeded from
the snapshot's upper directory; writeback() makes that directory equal to the
stream of the guest's upper directory (never mounting what the guest wrote).
Layers missing from the cache are converted side by side, in threads.

Device budget. QEMU's microvm machine has 8 virtio-mmio slots, shared with
the console, agent channels, entropy and network devices, so a rootfs gets at
most `max_lower_devices` (default 4) read-only disks plus its writable one.
An image with more layers keeps its top `max_lower_devices - 1` layers as
separate disks and flattens all layers below them into one EROFS image,
keyed by the chain of their keys. The bottom of a layer stack is the part
images share (their common base), so the flattened image is shared by every
image built on the same base, while the image-specific top layers stay
cached one by one. Flattening stacks the layers with a read-only overlayfs
mount on the host, so whiteouts and opaque directories mean exactly what
they mean to the guest's overlayfs; this applies to erofs-snapshotter blobs
too, which are otherwise never converted.

Serials (virtio-blk, at most 20 characters): `sb-l<N>` for the N-th lower,
topmost first, and `sb-up` for the writable layer. The guest finds each disk
by serial, mounts the lowers (EROFS) and the upper (ext4, whose root holds
`upper/` and `work/`) and stacks them with overlayfs; a rootfs without
layers gets an empty lower, so the guest always has at least one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from google.protobuf import json_format

from spinbox.api.proto import agent_pb2
from spinbox.mounts import MountSpec
from spinbox.storage import erofs, upper, upperstream
from spinbox.storage.cache import FORMAT, Holder, LayerCache, SourceIdentity, chain_key, layer_key
from spinbox.storage.errors import StorageError
from spinbox.storage.mounts import Layer, LayerKind, parse_mounts
from spinbox.storage.system import os_error, remove_tree

UPPER_SERIAL = "sb-up"
UPPER_IMAGE = "upper.ext4"
STATE_FILE = "rootfs.json"
DEFAULT_MAX_LOWER_DEVICES = 4
MAX_PARALLEL_BUILDS = 4
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

T = TypeVar("T")

log = logging.getLogger(__name__)


def lower_serial(index: int, prefix: str = "sb") -> str:
    return f"{prefix}-l{index}"


@dataclass(frozen=True)
class BlockImage:
    """A disk for the VM (→ spinbox.vm.Disk)."""

    path: Path
    serial: str
    read_only: bool


def group_layers(count: int, max_devices: int) -> tuple[int, int]:
    """How many of `count` layers (topmost first) stay separate, and how many below are flattened."""
    if max_devices < 2:
        raise StorageError(f"max_lower_devices must be at least 2, not {max_devices}")
    if count <= max_devices:
        return count, 0
    return max_devices - 1, count - (max_devices - 1)


def rootfs_dir(work_dir: Path, container_id: str) -> Path:
    return work_dir / f"rootfs-{container_id}"


class PreparedRootfs:
    """Everything one container's rootfs took on the host; give it back with release()."""

    def __init__(
        self,
        container_id: str,
        directory: Path,
        cache: LayerCache,
        keys: Sequence[str],
        images: Sequence[BlockImage],
        request: agent_pb2.MountRootfsRequest,
        snapshot_upper: Path | None,
    ) -> None:
        self.container_id = container_id
        self.directory = directory
        self.cache = cache
        self.keys = tuple(keys)
        self.images = list(images)
        self.request = request
        self.snapshot_upper = snapshot_upper
        self._lock = asyncio.Lock()
        self._released = False

    @property
    def holder(self) -> Holder:
        return Holder.for_work_dir(self.directory)

    @property
    def upper_image(self) -> Path | None:
        return next((image.path for image in self.images if not image.read_only), None)

    @property
    def writable(self) -> bool:
        """Whether the guest's writes are written back (an ext4 writable layer over a snapshot)."""
        return self.upper_image is not None and self.snapshot_upper is not None

    async def writeback(self, stream: AsyncIterable[bytes]) -> None:
        """Make the snapshot's upper dir exactly the writable layer the guest streams
        (spinbox.storage.upperstream checks it); a refused stream leaves it as it was."""
        async with self._lock:
            if self._released:
                raise StorageError(f"the rootfs of {self.container_id} was already released")
            image, snapshot_upper = self.upper_image, self.snapshot_upper
            if image is None or snapshot_upper is None:
                return
            # The layer holds at most its disk's size; sparse files count by their size too.
            limits = upperstream.Limits(max_bytes=image.stat().st_size)
            what = f"the writable layer of container {self.container_id}"
            await upperstream.receive(stream, snapshot_upper, limits, what)

    async def release(self) -> None:
        """Drop the cache references and remove the rootfs's files; safe to call twice."""
        async with self._lock:
            if self._released:
                return
            await _in_thread(self.release_sync)
            self._released = True

    def release_sync(self) -> None:
        remove_tree(self.directory)
        self.cache.release(self.keys, self.holder)

    def save(self) -> None:
        state = {
            "format": FORMAT,
            "container_id": self.container_id,
            "keys": list(self.keys),
            "images": [{**asdict(i), "path": str(i.path)} for i in self.images],
            "request": json_format.MessageToDict(self.request),
            "snapshot_upper": str(self.snapshot_upper) if self.snapshot_upper else None,
        }
        path = self.directory / STATE_FILE
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(state))
        temp.rename(path)

    @classmethod
    def load(cls, work_dir: Path, container_id: str, cache: LayerCache) -> PreparedRootfs:
        """The rootfs prepared earlier for this container (e.g. before spinboxd restarted)."""
        directory = rootfs_dir(work_dir, container_id)
        try:
            state = json.loads((directory / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise StorageError(f"no prepared rootfs for {container_id} in {work_dir}") from exc
        request = json_format.ParseDict(state["request"], agent_pb2.MountRootfsRequest())
        images = [BlockImage(Path(i["path"]), i["serial"], i["read_only"]) for i in state["images"]]
        snapshot_upper = Path(state["snapshot_upper"]) if state["snapshot_upper"] else None
        return cls(container_id, directory, cache, state["keys"], images, request, snapshot_upper)


async def _in_thread(function: Callable[[], T], undo: Callable[[T], None] | None = None) -> T:
    """Run blocking work in a thread. When cancelled, still wait for it, so that it never runs
    on behind its caller's back (e.g. a writeback still mounted during release), then undo it."""
    task = asyncio.ensure_future(asyncio.to_thread(function))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        done = False
        try:
            result = await task
            done = True
        except Exception:
            pass  # it failed on its own, and gave back what it took
        if done and undo is not None:
            try:
                await asyncio.to_thread(undo, result)
            except Exception as e:
                log.error("giving back what a cancelled storage step took failed (its files stay): %s", e)
        raise


async def prepare_rootfs(
    container_id: str,
    mounts: list[MountSpec],
    work_dir: Path,
    cache: LayerCache,
    upper_size_mib: int,
    *,
    max_lower_devices: int = DEFAULT_MAX_LOWER_DEVICES,
    serial_prefix: str = "sb",
) -> PreparedRootfs:
    """Block images and the guest's MountRootfsRequest for a container's rootfs.

    The files live in `work_dir/rootfs-<container_id>/`. Disk serials start with
    `serial_prefix` (`<prefix>-l<N>`, `<prefix>-up`): rootfses sharing a VM need
    different prefixes. upper_size_mib 0 gives the
    guest a tmpfs upper instead of an ext4 image (its changes are not written back).
    The blocking work runs in a thread; if this is cancelled, what it took is given back.
    """
    return await _in_thread(
        lambda: _prepare(
            container_id, mounts, work_dir, cache, upper_size_mib, max_lower_devices, serial_prefix
        ),
        PreparedRootfs.release_sync,
    )


def _prepare(
    container_id: str,
    mounts: list[MountSpec],
    work_dir: Path,
    cache: LayerCache,
    upper_size_mib: int,
    max_lower_devices: int,
    serial_prefix: str = "sb",
) -> PreparedRootfs:
    if not _CONTAINER_ID.match(container_id):
        raise StorageError(f"the container id {container_id!r} is not a valid containerd id")
    if upper_size_mib < 0:
        raise StorageError(f"the writable layer size must not be negative, not {upper_size_mib} MiB")
    source = parse_mounts(mounts)
    separate, flattened = group_layers(len(source.lowers), max_lower_devices)
    directory = rootfs_dir(work_dir, container_id)
    try:
        directory.mkdir(parents=True, mode=0o700)
    except FileExistsError as exc:
        raise StorageError(f"a rootfs for {container_id} is already prepared in {work_dir}") from exc
    except OSError as exc:
        raise os_error(exc, f"creating {directory}") from exc
    holder = Holder.for_work_dir(directory)
    keys: list[str] = []
    try:
        jobs = [_layer_job(layer, cache, holder, keys) for layer in source.lowers[:separate]]
        if flattened:
            jobs.append(_flattened_job(source.lowers[separate:], cache, holder, keys))
        if not jobs:
            key = chain_key([])
            keys.append(key)
            jobs.append(lambda: cache.acquire(key, [], holder, erofs.build_empty_image))
        lowers = _run_jobs(jobs)
        images = [BlockImage(path, lower_serial(i, serial_prefix), True) for i, path in enumerate(lowers)]
        request = agent_pb2.MountRootfsRequest(
            container_id=container_id,
            lowers=[agent_pb2.BlockDevice(serial=i.serial, fstype="erofs", read_only=True) for i in images],
        )
        if source.upper is not None:
            if upper_size_mib == 0:
                request.tmpfs_upper = True
            else:
                image = directory / UPPER_IMAGE
                upper.create_upper_image(image, upper_size_mib, source.upper, directory)
                serial = f"{serial_prefix}-up"
                images.append(BlockImage(image, serial, False))
                request.upper.CopyFrom(agent_pb2.BlockDevice(serial=serial, fstype="ext4", read_only=False))
        prepared = PreparedRootfs(container_id, directory, cache, keys, images, request, source.upper)
        prepared.save()
        return prepared
    except BaseException:
        remove_tree(directory)
        cache.release(keys, holder)
        raise


def _run_jobs(jobs: Sequence[Callable[[], Path]]) -> list[Path]:
    """Run image builds side by side (mkfs.erofs uses one core); on failure, after all have ended."""
    workers = max(1, min(len(jobs), os.cpu_count() or 1, MAX_PARALLEL_BUILDS))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="spinbox-erofs") as pool:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]


def _layer_job(layer: Layer, cache: LayerCache, holder: Holder, keys: list[str]) -> Callable[[], Path]:
    if layer.kind is LayerKind.EROFS:
        return lambda: layer.path
    identity = SourceIdentity.of(layer)
    key = layer_key(identity)
    keys.append(key)  # before acquiring: a failure halfway through is released with the rest
    return lambda: cache.acquire(key, [identity], holder, lambda temp: erofs.build_image(temp, layer.path))


def _flattened_job(
    layers: Sequence[Layer], cache: LayerCache, holder: Holder, keys: list[str]
) -> Callable[[], Path]:
    identities = [SourceIdentity.of(layer) for layer in layers]
    key = chain_key([layer_key(identity) for identity in identities])
    keys.append(key)
    return lambda: cache.acquire(
        key, identities, holder, lambda temp: erofs.build_flattened_image(temp, layers, cache.tmp)
    )
