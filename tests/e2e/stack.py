"""spinbox's whole stack inside the private systemd: spinbox.service from this
tree, the shim on PATH through a wrapper, and containerd (Debian's 1.6 or the
2.x under /opt/spinbox-test) as a unit with the busybox test image imported."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from tests.harness.fixtures import artifacts_dir
from tests.harness.oci import DEFAULT_REFERENCE, build_image
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import PYTHON, TOP, installed

IMAGE = DEFAULT_REFERENCE
RUNTIME = "io.containerd.spinbox.v1"
SHIM_WRAPPER = "/usr/local/bin/containerd-shim-spinbox-v1"
CONTAINERD2 = Path("/opt/spinbox-test/containerd2/usr/bin")
NERDCTL = Path("/opt/spinbox-test/bin/nerdctl")


@dataclass(frozen=True)
class ContainerdBuild:
    name: str  # "1.6" or "2.x"
    bin_dir: Path

    @property
    def available(self) -> bool:
        return (self.bin_dir / "containerd").exists() and (self.bin_dir / "ctr").exists()


BUILDS = {
    "1.6": ContainerdBuild("1.6", Path("/usr/bin")),
    "2.x": ContainerdBuild("2.x", CONTAINERD2),
}

CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{address}"
"""

UNIT = """[Unit]
Description=containerd {name} for spinbox's end-to-end tests
After=spinbox.service

[Service]
ExecStart={binary} --config {config}
Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
Type=simple
Delegate=yes
KillMode=process
"""


class Containerd:
    """One containerd unit inside the private systemd, and its clients."""

    kind = ""  # in the names of its unit and directories

    def __init__(self, systemd: PrivateSystemd, build: ContainerdBuild) -> None:
        self.systemd = systemd
        self.build = build
        tag = self.kind + build.name.replace(".", "")
        self.unit = f"containerd-e2e-{tag}.service"
        self.root = f"/var/lib/containerd/e2e-{tag}"
        self.state = f"/run/containerd-e2e-{tag}"
        self.address = f"{self.state}/containerd.sock"
        self.config = f"/etc/containerd/e2e-{tag}.toml"

    def start(self) -> None:
        self.start_unit(CONFIG.format(root=self.root, state=self.state, address=self.address))
        self.systemd.wait_for(
            f"{self.unit} to serve", lambda: self.ctr("version", check=False).returncode == 0
        )
        image = build_image(artifacts_dir() / "images" / "busybox.tar")
        self.ctr("images", "import", str(image))

    def start_unit(self, config: str) -> None:
        self.systemd.write_file(self.config, config)
        unit = UNIT.format(name=self.build.name, binary=self.build.bin_dir / "containerd", config=self.config)
        self.systemd.write_file(f"/etc/systemd/system/{self.unit}", unit)
        self.systemd.daemon_reload()
        self.systemd.systemctl("start", self.unit)

    @classmethod
    @contextlib.contextmanager
    def running(cls, systemd: PrivateSystemd, build: ContainerdBuild) -> Iterator[Self]:
        """The unit started for the block, stopped afterwards."""
        instance = cls(systemd, build)
        instance.start()
        try:
            yield instance
        finally:
            instance.stop()

    def stop(self) -> None:
        self.systemd.systemctl("stop", self.unit, check=False)
        with contextlib.suppress(FileNotFoundError):
            self.systemd.path(f"/etc/systemd/system/{self.unit}").unlink()
        self.systemd.daemon_reload()

    def ctr(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return self.systemd.run(
            str(self.build.bin_dir / "ctr"), "--address", self.address, *args,
            check=check, input=input, timeout=timeout,
        )  # fmt: skip

    def nerdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`nerdctl ARGS` against this containerd, with Debian's CNI plugins."""
        return self.systemd.run(
            str(NERDCTL), "--address", self.address, "--namespace", "default",
            "--cni-path", "/usr/lib/cni", "--data-root", "/var/lib/nerdctl", *args,
            check=check, timeout=300,
        )  # fmt: skip

    def ctr_argv(self, *args: str) -> list[str]:
        return self.systemd.nsenter(str(self.build.bin_dir / "ctr"), "--address", self.address, *args)

    def run_bytes(
        self, *args: str, stdin: bytes = b"", timeout: float = 300
    ) -> subprocess.CompletedProcess[bytes]:
        """`ctr ARGS` with binary stdin and stdout."""
        return subprocess.run(
            self.ctr_argv(*args), input=stdin, capture_output=True, timeout=timeout, check=False
        )

    def in_pty(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`ctr ARGS` with a terminal of its own (for -t), through script(1)."""
        command = shlex.join(self.ctr_argv(*args)[len(self.systemd.nsenter()) :])
        return self.systemd.run("script", "-qec", command, "/dev/null", check=False)

    @contextlib.contextmanager
    def events(self) -> Iterator[list[tuple[str, dict[str, object]]]]:
        """`ctr events` while the block runs; afterwards the list holds (topic, event) pairs."""
        received: list[tuple[str, dict[str, object]]] = []
        # ctr runs under nsenter's child: it prints its pid inside the namespace to be stopped there.
        ctr = shlex.join([str(self.build.bin_dir / "ctr"), "--address", self.address, "events"])
        watcher = subprocess.Popen(
            self.systemd.nsenter("sh", "-c", f"echo $$; exec {ctr}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert watcher.stdout is not None
        pid = watcher.stdout.readline().strip()
        try:
            # Once containerd answers this, `ctr events` has had time to subscribe.
            self.ctr("version")
            yield received
            time.sleep(1)  # events already published may still be on their way
        finally:
            self.systemd.run("kill", pid, check=False)
            output, _ = watcher.communicate(timeout=30)
        for line in output.splitlines():
            # 2026-11-30 09:59:40.169 +0000 UTC default /tasks/create {...}
            parts = line.split(" ", 6)
            if len(parts) == 7:
                received.append((parts[5], json.loads(parts[6])))

    def tasks(self) -> dict[str, str]:
        """Task id -> status, from `ctr task ls`."""
        lines = self.ctr("task", "ls").stdout.splitlines()[1:]
        return {line.split()[0]: line.split()[-1] for line in lines if line.strip()}


def task_topics(events: list[tuple[str, dict[str, object]]], container_id: str) -> list[str]:
    """The /tasks/* topics about one container, in the order containerd got
    them; those about an exec end in `:<exec id>`."""
    topics = []
    for topic, event in events:
        if not topic.startswith("/tasks/") or event.get("container_id") != container_id:
            continue
        process = event.get("exec_id") or event.get("id") or container_id
        topics.append(topic if process == container_id else f"{topic}:{process}")
    return topics


def leftovers(systemd: PrivateSystemd, containerd: Containerd) -> dict[str, object]:
    """Everything a finished container may leave behind."""
    units = systemd.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "spinbox-vm-*").stdout
    vm_dir = systemd.path("/run/spinbox/vm")
    shims = [p for p in systemd.processes("containerd-shim-spinbox-v1") if p]
    # VM templates spinboxd builds in the background are its own, not a container's.
    templates = set(systemd.processes("process=spinbox-vm-template-"))
    return {
        "scopes": [
            line.split()[0]
            for line in units.splitlines()
            if line.strip() and not line.startswith("spinbox-vm-template-")
        ],
        "qemu": [pid for pid in systemd.processes("qemu-system") if pid not in templates],
        "virtiofsd": systemd.processes("virtiofsd"),
        "vm-files": sorted(str(p) for p in vm_dir.rglob("*")) if vm_dir.exists() else [],
        "shims": shims,
        "tasks": containerd.ctr("task", "ls", "-q").stdout.split(),
        "containers": containerd.ctr("containers", "ls", "-q").stdout.split(),
        "shim-sockets": sorted(p.name for p in systemd.path("/run/containerd/s").glob("*")),
        "netns": sorted(p.name for p in systemd.path("/run/netns").glob("spinbox-*")),
        "fifos": sorted(str(p) for p in systemd.path("/run/containerd/fifo").rglob("*")),
        "mounts": [
            target
            for target in systemd.run("findmnt", "-rn", "-o", "TARGET").stdout.split()
            if target.startswith(("/run/spinbox/", "/var/lib/spinbox/")) or ".runtime.v2.task/" in target
        ],
    }


NOTHING_LEFT = {
    "scopes": [],
    "qemu": [],
    "virtiofsd": [],
    "vm-files": [],
    "shims": [],
    "tasks": [],
    "containers": [],
    "shim-sockets": [],
    "netns": [],
    "fifos": [],
    "mounts": [],
}


def wait_until_clean(
    systemd: PrivateSystemd, containerd: Containerd, timeout: float = 60
) -> dict[str, object]:
    """Leftovers once teardown (which runs asynchronously) had time to finish."""
    deadline = time.monotonic() + timeout
    found = leftovers(systemd, containerd)
    while found != NOTHING_LEFT and time.monotonic() < deadline:
        time.sleep(0.5)
        found = leftovers(systemd, containerd)
    return found


# The e2e tier runs with VMs booted cold, or restored from templates with
# SPINBOX_TEST_BOOT=template (vm.boot in spinbox.toml; `make test-e2e-templates`).
BOOT = os.environ.get("SPINBOX_TEST_BOOT", "cold")
if BOOT not in ("cold", "template"):
    raise ValueError(f'SPINBOX_TEST_BOOT is "cold" or "template", not {BOOT!r}')
TEMPLATES = "/run/spinbox/templates"
TEMPLATE_BUILD_TIMEOUT = 900.0


def ready_templates(systemd: PrivateSystemd) -> list[str]:
    """The names of the VM templates spinboxd has ready."""
    root = systemd.path(TEMPLATES)
    return sorted(p.parent.name for p in root.glob("*/ready.json")) if root.exists() else []


def wait_for_default_template(systemd: PrivateSystemd) -> None:
    """Until the spinboxd just started has its default size's template for today's kernel,
    image and QEMU (one of an earlier image may be ready beside it, soon to be removed)."""
    invocation = systemd.unit_property("spinbox.service", "InvocationID")

    def ready() -> bool:
        lines = systemd.journal("-u", "spinbox.service", f"_SYSTEMD_INVOCATION_ID={invocation}", "-o", "cat")
        failed = re.search(
            r"^(building the VM template .* failed|no VM template for .*)$", lines, re.MULTILINE
        )
        if failed:
            raise AssertionError(f"spinboxd has no VM template: {failed.group(0)}")
        return re.search(r"^VM template \S+ is ready$", lines, re.MULTILINE) is not None

    systemd.wait_for("spinboxd's VM template", ready, TEMPLATE_BUILD_TIMEOUT, interval=1)


@contextlib.contextmanager
def spinbox_stack(systemd: PrivateSystemd, guest_image: Path, boot: str = BOOT) -> Iterator[PrivateSystemd]:
    """spinbox.service with the session's guest image, and the shim on PATH.
    With boot "template", once spinboxd has built its default template."""
    config = f'[vm]\naccel = "tcg"\ninitrd = "{guest_image}"\nboot = "{boot}"\n'
    # Shaped like the packaged script (tools/install-tree): a Python script by the shim's name.
    wrapper = (
        f"#!{PYTHON}\nimport sys\n\nsys.path.insert(0, {str(TOP)!r})\n\n"
        "from spinbox.shim.__main__ import main\n\nsys.exit(main())\n"
    )
    with installed(systemd, config=config):
        systemd.write_file(SHIM_WRAPPER, wrapper, mode=0o755)
        cursor = (
            systemd.run("journalctl", "-n0", "--show-cursor", "-q").stdout.partition("cursor: ")[2].strip()
        )
        systemd.systemctl("start", "spinbox.service")
        if boot == "template":
            wait_for_default_template(systemd)
        try:
            yield systemd
        finally:
            with contextlib.suppress(FileNotFoundError):
                systemd.path(SHIM_WRAPPER).unlink()
            record_boots(systemd, boot, cursor)


def record_boots(systemd: PrivateSystemd, boot: str, cursor: str) -> None:
    """How the stack's VMs started (restored from a template or booted cold), appended to
    boots.txt in the artifacts directory: a run in template mode shows it restored VMs."""
    after = [f"--after-cursor={cursor}"] if cursor else []
    lines = systemd.journal("-u", "spinbox.service", *after, "-o", "cat")
    counts = collections.Counter(re.findall(r"^VM \S+ is running \(.*, (\w+) boot\)$", lines, re.MULTILINE))
    tests = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
    with (artifacts_dir() / "boots.txt").open("a") as summary:
        summary.write(
            f"{tests or '?'}: vm.boot = {boot}: {counts['template']} VM(s) restored from a template, "
            f"{counts['cold']} booted cold\n"
        )


# Kubernetes' CRI: containerd's CRI plugin with the `spinbox` runtime handler
# configured as packaging/containerd/ says (1.6: cri-v2.toml appended to the main
# file; 2.x: cri-v3.toml imported from conf.d), pods on a CNI bridge, and crictl.
CRICTL = Path("/opt/spinbox-test/bin/crictl")
PAUSE_IMAGE = "localhost/spinbox/pause:latest"
POD_SUBNET = "10.88.77.0/24"
CRI_CONFIG = {
    "1.6": """version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{address}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
""",
    "2.x": """version = 3
root = "{root}"
state = "{state}"
imports = ["/etc/containerd/conf.d/*.toml"]
[grpc]
  address = "{address}"
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{pause}"
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "/etc/cni/net.d"
""",
}
CRI_DROP_IN = "/etc/containerd/conf.d/spinbox.toml"
CNI_CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "spinbox-e2e-pods",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "sbpods0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        },
        # A pod's host ports, as containerd's own example network has them.
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
CNI_FILE = "/etc/cni/net.d/10-spinbox-e2e-pods.conflist"


class CriContainerd(Containerd):
    """containerd with its CRI plugin on, the spinbox handler configured as the package says."""

    kind = "cri"

    def start(self) -> None:
        self.systemd.write_file(CNI_FILE, json.dumps(CNI_CONFLIST))
        config = CRI_CONFIG[self.build.name].format(
            root=self.root, state=self.state, address=self.address, pause=PAUSE_IMAGE
        )
        if self.build.name == "1.6":
            config += (TOP / "packaging/containerd/cri-v2.toml").read_text()
        else:
            self.systemd.install(TOP / "packaging/containerd/cri-v3.toml", CRI_DROP_IN, mode=0o644)
        self.start_unit(config)
        self.systemd.wait_for(
            f"{self.unit} to serve CRI", lambda: self.crictl("version", check=False).returncode == 0
        )
        images = artifacts_dir() / "images"
        for image in (
            build_image(images / "busybox.tar"),
            # Not `sleep`: critest looks for a `sleep` it ran in a pod's PID namespace, whose PID 1 this is.
            build_image(images / "pause.tar", PAUSE_IMAGE, cmd=("tail", "-f", "/dev/null")),
        ):
            self.ctr("-n", "k8s.io", "images", "import", str(image))

    def stop(self) -> None:
        super().stop()
        for path in (CNI_FILE, CRI_DROP_IN):
            with contextlib.suppress(FileNotFoundError):
                self.systemd.path(path).unlink()

    def crictl(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return self.systemd.run(
            str(CRICTL), "--runtime-endpoint", f"unix://{self.address}", "--image-endpoint",
            f"unix://{self.address}", "--timeout", "240s", *args, check=check, timeout=timeout,
        )  # fmt: skip
