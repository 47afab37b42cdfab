"""A system container image built locally: Debian with systemd and Docker (docker.io),
made by mmdebstrap from the host's own apt sources, as an OCI image layout tar that
`ctr images import` loads. It carries a tiny busybox image in Docker's archive format
(/root/nested.tar) for `docker load` inside, so no registry is needed at any level.

    python3 -m tests.harness.debimage [OUT_DIR]

The result is cached by its inputs (the recipe, the suite, the apt sources, busybox):
a second run returns the same file at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.oci import (
    BUSYBOX,
    CONFIG_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    _add,
    _descriptor,
    _json,
    busybox_layer,
)

REFERENCE = "localhost/spinbox/debian-syscont:latest"
NESTED_REFERENCE = "spinbox/nested:latest"
NESTED_PATH = "/root/nested.tar"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "kmod", "docker.io", "iproute2", "iputils-ping")
# Documentation and translations make the image bigger and the test slower, and nothing reads them.
EXCLUDED = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
APT_SOURCES = Path("/etc/apt")
# Part of the cache key with the constants above: raise it when the build changes otherwise.
RECIPE_VERSION = 1
CHUNK = 1 << 20


@dataclass(frozen=True)
class BuiltImage:
    path: Path
    reference: str
    size: int
    seconds: float  # 0 when it came from the cache


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    for line in os_release.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip('"'):
            return value.strip('"')
    raise RuntimeError(f"{os_release} names no VERSION_CODENAME: cannot tell which Debian suite to use")


def host_sources(root: Path = APT_SOURCES) -> list[Path]:
    """The host's enabled apt source files (one-line .list and deb822 .sources)."""
    files = [root / "sources.list"] if (root / "sources.list").is_file() else []
    directory = root / "sources.list.d"
    if directory.is_dir():
        files += sorted(p for p in directory.iterdir() if p.suffix in (".list", ".sources") and p.is_file())
    files = [
        p
        for p in files
        if any(line.strip() and not line.startswith("#") for line in p.read_text().splitlines())
    ]
    if not files:
        raise RuntimeError(f"no apt sources in {root}: mmdebstrap needs the host's Debian mirror")
    return files


def nested_archive(out: Path, busybox: Path = BUSYBOX) -> Path:
    """busybox as a `docker save` archive (manifest.json format, which every Docker loads)."""
    layer = busybox_layer(busybox)
    layer_id = hashlib.sha256(layer).hexdigest()
    config = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_id}"]},
        }
    )
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = _json(
        [{"Config": config_name, "RepoTags": [NESTED_REFERENCE], "Layers": [f"{layer_id}/layer.tar"]}]
    )
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, layer_id, kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, f"{layer_id}/layer.tar", layer)
        _add(tar, config_name, config)
        _add(tar, "manifest.json", manifest)
    return out


def _cache_key(suite: str, sources: list[Path], busybox: Path) -> str:
    digest = hashlib.sha256()
    recipe = _json([RECIPE_VERSION, REFERENCE, NESTED_REFERENCE, NESTED_PATH, PACKAGES, EXCLUDED])
    for part in (recipe, suite.encode(), busybox.read_bytes()):
        digest.update(hashlib.sha256(part).digest())
    for source in sources:
        digest.update(hashlib.sha256(source.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _layout(out: Path, layer: Path) -> None:
    """The OCI image layout tar of one uncompressed layer (streamed: it is hundreds of MB)."""
    layer_digest = _file_digest(layer)
    config = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/sbin/init"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        }
    )
    layer_descriptor = {
        "mediaType": LAYER_MEDIA_TYPE,
        "digest": f"sha256:{layer_digest}",
        "size": layer.stat().st_size,
    }
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": _descriptor(CONFIG_MEDIA_TYPE, config),
            "layers": [layer_descriptor],
        }
    )
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [
                {
                    **_descriptor(MANIFEST_MEDIA_TYPE, manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": REFERENCE,
                        "org.opencontainers.image.ref.name": "latest",
                    },
                }
            ],
        }
    )
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _add(tar, "blobs", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "blobs/sha256", kind=tarfile.DIRTYPE, mode=0o755)
        info = tarfile.TarInfo(f"blobs/sha256/{layer_digest}")
        info.size = layer.stat().st_size
        info.mode = 0o644
        with layer.open("rb") as f:
            tar.addfile(info, f)
        for blob in (config, manifest):
            _add(tar, f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob)
        _add(tar, "index.json", index)


def build_syscont_image(directory: Path, busybox: Path = BUSYBOX) -> BuiltImage:
    """The image under `directory`, built by mmdebstrap unless an identical build is there."""
    suite = host_suite()
    sources = host_sources()
    out = directory / f"debian-syscont-{_cache_key(suite, sources, busybox)}.tar"
    if out.is_file():
        return BuiltImage(out, REFERENCE, out.stat().st_size, 0.0)
    start = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spinbox-syscont-", dir=directory) as scratch:
        nested = nested_archive(Path(scratch) / "nested.tar", busybox)
        rootfs = Path(scratch) / "rootfs.tar"
        argv = [
            "mmdebstrap", "--quiet", "--variant=essential", "--skip=output/mknod",
            f"--include={','.join(PACKAGES)}",
            *(f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDED),
            f"--customize-hook=copy-in {nested} {os.path.dirname(NESTED_PATH)}",
            suite, str(rootfs), *map(str, sources),
        ]  # fmt: skip
        try:
            subprocess.run(argv, check=True, capture_output=True, text=True, timeout=1800)
        except FileNotFoundError:
            raise RuntimeError("mmdebstrap is not installed: apt install mmdebstrap") from None
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"mmdebstrap failed:\n{e.stderr[-4000:]}") from None
        partial = Path(scratch) / "image.tar"
        _layout(partial, rootfs)
        partial.replace(out)
    for old in directory.glob("debian-syscont-*.tar"):
        if old != out:
            old.unlink()
    return BuiltImage(out, REFERENCE, out.stat().st_size, time.monotonic() - start)


def main() -> int:
    if len(sys.argv) > 2 or sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    from tests.harness.fixtures import artifacts_dir

    directory = Path(sys.argv[1]) if len(sys.argv) == 2 else artifacts_dir() / "images"
    image = build_syscont_image(directory)
    took = f"built in {image.seconds:.1f} s" if image.seconds else "from the cache"
    print(f"{image.path}: {image.reference}, {image.size / 1e6:.0f} MB, {took}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
