"""A real systemd as PID 1 of a private PID, mount, network and UTS namespace.

The machines spinbox is tested on do not boot systemd, so tests boot one of
their own: `unshare` gives it PID 1 of a new PID namespace, a private mount
table, its own network stack and a cgroup2 subtree of its own (so that two of
them, from two test runs, never manage the same cgroups). /etc, /usr and /var
are overlays whose writes land in a tmpfs, so installing files or packages
inside never touches the host. Killing its PID 1 ends everything inside.

Enter it with `run()`; reach its system bus from the test process through
`bus_address`; read its journal with `journal()`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")

# Runs as PID 1 of the new namespaces, then execs systemd. Everything it mounts
# lives and dies with the mount namespace.
_BOOT_SCRIPT = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/.harness
mount -t tmpfs -o mode=0700 tmpfs /run/.harness
# The tree under test (and its virtualenv) stay visible even where they live
# under /tmp, which is private here: set aside before the tmpfs hides them,
# then bound back at the same path.
n=0
for keep in $HARNESS_KEEP; do
    case "$keep" in
    /tmp/*)
        mkdir -p /run/.harness/keep/$n
        mount --rbind "$keep" /run/.harness/keep/$n
        n=$((n + 1)) ;;
    esac
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
n=0
for keep in $HARNESS_KEEP; do
    case "$keep" in
    /tmp/*)
        mkdir -p "$keep"
        mount --rbind /run/.harness/keep/$n "$keep"
        n=$((n + 1)) ;;
    esac
done
for d in etc usr var; do
    mkdir -p /run/.harness/$d/upper /run/.harness/$d/work
    mount -t overlay overlay \
        -o lowerdir=/$d,upperdir=/run/.harness/$d/upper,workdir=/run/.harness/$d/work /$d
done
# systemd-tmpfiles must never empty /tmp at boot, whatever is mounted there.
mkdir -p /etc/tmpfiles.d
ln -sf /dev/null /etc/tmpfiles.d/tmp.conf
ln -sf /dev/null /etc/tmpfiles.d/x11.conf
# Stores that other overlays or loop devices are built on need a real
# filesystem underneath, not an overlay.
for d in /var/lib/containerd /var/lib/spinbox /var/lib/cni /var/lib/nerdctl /var/log/journal; do
    mkdir -p "$d"
    mount -t tmpfs -o mode=0755 tmpfs "$d"
done
hostname "$HARNESS_NAME"
ip link set lo up
cg="$HARNESS_CGROUP"
mkdir "$cg"
echo $$ > "$cg/cgroup.procs"
exec unshare --cgroup sh -c '
    set -eu
    mount -t sysfs sysfs /sys
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
    exec /lib/systemd/systemd --system --unit=multi-user.target
'
"""


_UNSHARE_ARGV = [
    "unshare", "--pid", "--fork", "--mount", "--mount-proc", "--net", "--uts",
    "sh", "-c", _BOOT_SCRIPT,
]  # fmt: skip


def _kept_paths() -> list[str]:
    """Host paths the namespace must see although they may sit under /tmp."""
    top = Path(__file__).resolve().parents[2]
    paths = {str(top), sys.prefix, os.environ.get("SPINBOX_TEST_ARTIFACTS", "")}
    return sorted(p for p in paths if p and " " not in p)


class HarnessError(RuntimeError):
    pass


class PrivateSystemd:
    """One booted systemd in its own namespaces. Use `PrivateSystemd.booted()`."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.cgroup = CGROUP2_ROOT / f"spinbox-test-{name}"
        self._unshare: subprocess.Popen[bytes] | None = None
        self.pid = 0

    # -- life cycle -------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def booted(cls, log_dir: Path, name: str | None = None, timeout: float = 90) -> Iterator[PrivateSystemd]:
        name = name or uuid.uuid4().hex[:12]
        log_dir.mkdir(parents=True, exist_ok=True)
        instance = cls(name, log_dir / f"systemd-{name}.log")
        try:
            instance.boot(timeout)
            yield instance
        finally:
            instance.stop()

    def boot(self, timeout: float) -> None:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "container": "spinbox-test",
            "HARNESS_NAME": f"spinbox-test-{self.name}",
            "HARNESS_CGROUP": str(self.cgroup),
            "HARNESS_KEEP": " ".join(_kept_paths()),
        }
        with open(self.log_path, "wb") as log:
            self._unshare = subprocess.Popen(
                _UNSHARE_ARGV,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.pid = self._find_child(timeout=10)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise HarnessError(f"private systemd exited during boot; see {self.log_path}")
            result = self.run("systemctl", "is-system-running", check=False, timeout=10)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise HarnessError(f"private systemd did not finish booting (state {state!r}); see {self.log_path}")

    def _find_child(self, timeout: float) -> int:
        assert self._unshare is not None
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids:
                    return int(pids[0])
            if self._unshare.poll() is not None:
                raise HarnessError(f"unshare exited at once; see {self.log_path}")
            time.sleep(0.02)
        raise HarnessError("unshare did not fork its PID 1")

    def stop(self) -> None:
        """Kill PID 1 (the kernel then kills every process in the namespace) and
        remove the cgroup subtree."""
        if self._unshare is None:
            return
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        try:
            self._unshare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._unshare.kill()
            self._unshare.wait()
        self._unshare = None
        self._remove_cgroup()

    def _remove_cgroup(self) -> None:
        if not self.cgroup.exists():
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            dirs = sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            with contextlib.suppress(OSError):
                for d in dirs:
                    d.rmdir()
                self.cgroup.rmdir()
                return
            time.sleep(0.1)

    # -- using it ---------------------------------------------------------

    def nsenter(self, *cmd: str) -> list[str]:
        """The argv that runs `cmd` inside the namespaces."""
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "--", *cmd]

    def run(
        self,
        *cmd: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = (
            self.nsenter("env", *[f"{k}={v}" for k, v in (env or {}).items()], *cmd)
            if env
            else self.nsenter(*cmd)
        )
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"{shlex.join(cmd)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.nsenter(*cmd), **kwargs)  # type: ignore[call-overload, no-any-return]

    @property
    def root(self) -> Path:
        """The namespace's file system as seen from the test process."""
        return Path(f"/proc/{self.pid}/root")

    def path(self, inside: str | Path) -> Path:
        return self.root / str(inside).lstrip("/")

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.path('/run/dbus/system_bus_socket')}"

    def write_file(self, inside: str, content: str | bytes, mode: int = 0o644) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
        target.chmod(mode)

    def install(self, source: Path, inside: str, mode: int | None = None) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(mode if mode is not None else source.stat().st_mode & 0o777)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def unit_property(self, unit: str, prop: str) -> str:
        return self.systemctl("show", unit, "-p", prop, "--value").stdout.strip()

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", *args).stdout

    def wait_for(self, what: str, predicate: object, timeout: float = 30, interval: float = 0.2) -> None:
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(interval)
        raise HarnessError(f"timed out after {timeout}s waiting for {what}")

    def processes(self, pattern: str) -> list[int]:
        result = self.run("pgrep", "-f", pattern, check=False)
        return [int(p) for p in result.stdout.split()]


def host_leftovers(patterns: Sequence[str]) -> list[str]:
    """Processes on the whole machine whose command line matches one of `patterns`."""
    found = []
    for pattern in patterns:
        result = subprocess.run(["pgrep", "-a", "-f", pattern], capture_output=True, text=True, check=False)
        found += [line for line in result.stdout.splitlines() if "pgrep" not in line]
    return found
