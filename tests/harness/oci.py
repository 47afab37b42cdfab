"""A small container image built locally: Debian's static busybox as an OCI
image layout tar that `ctr images import` loads (no registry is reachable).

    python3 -m tests.harness.oci OUT.tar [REFERENCE]

The image has one uncompressed layer: /bin/busybox, a symlink per applet in
/bin, and the usual empty mount points. Its default command is `sh`. The
output depends only on the busybox binary, so it is the same on every run.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
DEFAULT_REFERENCE = "localhost/spinbox/busybox:latest"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, link: str = "") -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.linkname = link
    info.size = len(data) if data is not None else 0
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def busybox_layer(busybox: Path = BUSYBOX) -> bytes:
    """The root file system as an uncompressed, reproducible tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "var"):
            _add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _add(tar, "bin/busybox", busybox.read_bytes(), mode=0o755)
        for applet in _applets(busybox):
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, mode=0o777, link="busybox")
        _add(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        _add(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def build_image(
    out: Path, reference: str = DEFAULT_REFERENCE, busybox: Path = BUSYBOX, cmd: tuple[str, ...] = ("sh",)
) -> Path:
    """Writes the OCI image layout tar `out` holding one image named `reference`, running `cmd`."""
    layer = busybox_layer(busybox)
    config = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": list(cmd), "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]},
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": _descriptor(CONFIG_MEDIA_TYPE, config),
            "layers": [_descriptor(LAYER_MEDIA_TYPE, layer)],
        }
    )
    tag = reference.rsplit(":", 1)[1] if ":" in reference.rsplit("/", 1)[-1] else "latest"
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [
                {
                    **_descriptor(MANIFEST_MEDIA_TYPE, manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": reference,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _add(tar, "blobs", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "blobs/sha256", kind=tarfile.DIRTYPE, mode=0o755)
        for blob in (layer, config, manifest):
            _add(tar, f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob)
        _add(tar, "index.json", index)
    return out


def main() -> int:
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        print(f"usage: python3 -m tests.harness.oci OUT.tar [REFERENCE (default {DEFAULT_REFERENCE})]")
        return 0 if len(sys.argv) == 2 else 2
    build_image(Path(sys.argv[1]), *sys.argv[2:3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
