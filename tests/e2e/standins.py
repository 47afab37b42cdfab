"""Stand-ins for the images critest names, built from Debian's busybox and pushed
with skopeo to a registry on 127.0.0.1 (Debian's docker-registry), to which
containerd's registry mirrors point the public names. An image named by digest
cannot be stood in for: its spec fails by design.

They are made to behave as the images they stand in for wherever critest looks:
- busybox is Debian's dynamically linked one with its C library (busybox-static's
  shell runs applets itself, where the real image's shell runs /bin/ls, which a
  masked path must stop), its applets hard links as in the real image;
- pgrep and ipcs, which Debian's busybox lacks, are small scripts;
- every image has a file naming it, so no two stand-ins share an image id;
- nginx's first process says "nginx: master process", httpd logs a line at start;
- nonewprivs runs nnp (tests/e2e/nnp), installed setuid root.
tools/install-test-clients puts busybox and nnp in /opt/spinbox-test/standins."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.oci import (
    CONFIG_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    _add,
    _applets,
    _descriptor,
    _json,
)

PARTS = Path("/opt/spinbox-test/standins")
BUSYBOX = PARTS / "busybox"
NNP = PARTS / "nnp"

REGISTRY = "127.0.0.1:5015"
MIRRORED = ("registry.k8s.io", "gcr.io")
E2E = "e2e-test-images"
CRI_TOOLS = "k8s-staging-cri-tools"
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n"
    "default-user:x:1000:1000::/home/default-user:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
)
GROUP = "root:x:0:\nwww-data:x:33:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"
NGINX_PAGE = "<html><head><title>Welcome to nginx!</title></head><body>Welcome to nginx!</body></html>\n"
PGREP = """#!/bin/sh
# pgrep PATTERN: the ids of the processes whose name matches PATTERN.
status=1
for dir in /proc/[0-9]*; do
    name=$(cat "$dir/comm" 2>/dev/null) || continue
    if echo "$name" | grep -qE -- "$1"; then echo "${dir#/proc/}"; status=0; fi
done
exit $status
"""
IPCS = """#!/bin/sh
# ipcs -m: the System V shared memory segments of this IPC namespace.
echo
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch     status"
tail -n +2 /proc/sysvipc/shm | while read -r key shmid perms size cpid lpid nattch uid rest; do
    printf '0x%08x %-10s %-10s %-10s %-10s %-10s\\n' "$key" "$shmid" "$uid" "$perms" "$size" "$nattch"
done
echo
"""


@dataclass(frozen=True)
class StandIn:
    repository: str  # path in the registry, e.g. e2e-test-images/busybox
    tags: tuple[str, ...]
    cmd: tuple[str, ...] = ("sh",)
    user: str = ""
    files: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()
    setuid_nnp: bool = False  # /usr/local/bin/nnp, setuid root


def _web(port: int) -> StandIn:
    return StandIn("", (), cmd=("httpd", "-f", "-v", "-p", str(port), "-h", "/www"),
                   files={"www/index.html": NGINX_PAGE}, ports=(port,))  # fmt: skip


def stand_ins() -> list[StandIn]:
    web, hostnet = _web(80), _web(12003)
    serve = " ".join(web.cmd)
    # nginx's master process stays the container's first process; its cmdline says so.
    nginx = (
        "sh", "-c", f"trap 'kill $server; exit 0' TERM; {serve} & server=$!; wait", "nginx: master process"
    )  # fmt: skip
    httpd = ("sh", "-c", f"echo 'httpd: serving /www on port 80' >&2; exec {serve}")
    images = [
        StandIn(f"{E2E}/busybox", ("1.29-2",)),
        StandIn(f"{E2E}/nginx", ("1.14-2",), nginx, files=web.files, ports=web.ports),
        StandIn(f"{E2E}/httpd", ("2.4.39-4",), httpd, files=web.files, ports=web.ports),
        StandIn(f"{E2E}/nonewprivs", ("1.3",), ("/usr/local/bin/nnp",), setuid_nnp=True),
        StandIn(f"{E2E}/pause", ("3.6", "3.10"), ("sleep", "2147483647")),
        StandIn(f"{CRI_TOOLS}/hostnet-nginx-amd64", ("latest",), hostnet.cmd, files=hostnet.files),
        StandIn(f"{CRI_TOOLS}/test-image-user-uid", ("latest",), user="1002"),
        StandIn(f"{CRI_TOOLS}/test-image-user-username", ("latest",), user="www-data"),
        StandIn(f"{CRI_TOOLS}/test-image-user-uid-group", ("latest",), user="1003:users"),
        StandIn(f"{CRI_TOOLS}/test-image-user-username-group", ("latest",), user="www-data:www-data"),
        StandIn(f"{CRI_TOOLS}/test-image-predefined-group", ("latest",), user="1000"),
        StandIn(f"{CRI_TOOLS}/test-image-latest", ("latest",)),
        StandIn(f"{CRI_TOOLS}/test-image-tag", ("test", "all")),
        StandIn(f"{CRI_TOOLS}/test-image-tags", ("1", "2", "3")),
    ]
    for n in (1, 2, 3):  # three different images
        images.append(StandIn(f"{CRI_TOOLS}/test-image-{n}", ("latest",), files={f"test-{n}": f"{n}\n"}))
    return images


def _libraries(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads, its dynamic loader included, as ldd finds them."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return sorted({Path(word) for word in out.split() if word.startswith("/")})


def base_layer(busybox: Path = BUSYBOX) -> bytes:
    """busybox, its libraries and a hard link per applet, as an uncompressed, reproducible tar."""
    if not busybox.is_file():
        raise SystemExit(f"no {busybox}: tools/install-test-clients puts it there")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()
        for library in _libraries(busybox):
            real = library.resolve()
            parts = library.parts[1:-1]
            for i in range(1, len(parts) + 1):
                if "/".join(parts[:i]) not in made:
                    _add(tar, "/".join(parts[:i]), kind=tarfile.DIRTYPE, mode=0o755)
                    made.add("/".join(parts[:i]))
            _add(tar, str(library)[1:], real.read_bytes(), mode=0o755)
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "var"):
            _add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _add(tar, "bin/busybox", busybox.read_bytes(), mode=0o755)
        for applet in _applets(busybox):
            _add(tar, f"bin/{applet}", kind=tarfile.LNKTYPE, mode=0o755, link="bin/busybox")
    return buf.getvalue()


def _extra_layer(image: StandIn) -> bytes:
    buf = io.BytesIO()
    files = {
        "etc/passwd": PASSWD, "etc/group": GROUP, "etc/stand-in": f"{image.repository}\n",
        "usr/local/bin/pgrep": PGREP, "usr/local/bin/ipcs": IPCS, **image.files,
    }  # fmt: skip
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = {"etc"}
        if image.setuid_nnp:
            files["usr/local/bin/nnp"] = ""
        for name, text in sorted(files.items()):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in made:
                    _add(tar, d, kind=tarfile.DIRTYPE, mode=0o755)
                    made.add(d)
            if name == "usr/local/bin/nnp" and image.setuid_nnp:
                _add(tar, name, NNP.read_bytes(), mode=0o4755)
            else:
                _add(tar, name, text.encode(), mode=0o755 if "/bin/" in name else 0o644)
    return buf.getvalue()


def write_archive(image: StandIn, out: Path, base: bytes) -> Path:
    """The image as an OCI layout tar (skopeo's oci-archive:)."""
    extra = _extra_layer(image)
    layers = (base, extra)
    config_doc: dict[str, object] = {
        "Env": ["PATH=/usr/local/bin:/bin"],
        "Cmd": list(image.cmd),
        "WorkingDir": "/",
    }
    if image.user:
        config_doc["User"] = image.user
    if image.ports:
        config_doc["ExposedPorts"] = {f"{p}/tcp": {} for p in image.ports}
    config = _json({
        "architecture": "amd64", "os": "linux", "config": config_doc,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(x).hexdigest()}" for x in layers]},
    })  # fmt: skip
    manifest = _json({
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
        "config": _descriptor(CONFIG_MEDIA_TYPE, config),
        "layers": [_descriptor(LAYER_MEDIA_TYPE, x) for x in layers],
    })  # fmt: skip
    index = _json({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE,
                   "manifests": [_descriptor(MANIFEST_MEDIA_TYPE, manifest)]})  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed into place: sessions side by side in one checkout share the
    # archives, and one must never push the other's half-written one.
    partial = out.with_name(f".{out.name}.{os.getpid()}")
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _add(tar, "blobs", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "blobs/sha256", kind=tarfile.DIRTYPE, mode=0o755)
        for blob in (*layers, config, manifest):
            _add(tar, f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob)
        _add(tar, "index.json", index)
    os.replace(partial, out)
    return out


def push_all(
    directory: Path, run: Callable[..., object], registry: str = REGISTRY, busybox: Path = BUSYBOX
) -> list[str]:
    """Builds every stand-in and pushes it to `registry` with `run(*argv)` (skopeo where the
    registry's network is); returns the references pushed."""
    base = base_layer(busybox)
    pushed = []
    for image in stand_ins():
        archive = write_archive(image, directory / f"{image.repository.replace('/', '_')}.tar", base)
        for tag in image.tags:
            reference = f"{registry}/{image.repository}:{tag}"
            run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci-archive:{archive}",
                f"docker://{reference}")  # fmt: skip
            pushed.append(reference)
    return pushed
