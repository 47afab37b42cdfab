"""What PID 1 does before serving: mounts, kernel modules, entropy, cgroups.

Every step logs and carries on when it fails: a guest that boots with a
missing piece can still answer Ping and say what is wrong.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from guest.vminitd import syscalls
from guest.vminitd.timeline import Timeline

log = logging.getLogger(__name__)

MODULES_LIST = Path("/etc/spinbox/modules")
# The line of MODULES_LIST after which modules are not needed to serve the agent.
DEFERRED_MARK = "# deferred"
CGROUP_CONTROLLERS = ("cpu", "memory", "pids", "io")

_NOSUID_NODEV_NOEXEC = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
MOUNTS: tuple[tuple[str, str, str, int, str], ...] = (
    ("proc", "/proc", "proc", _NOSUID_NODEV_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", _NOSUID_NODEV_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", syscalls.MS_NOSUID, "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
        "mode=0620,ptmxmode=0666,gid=5",
    ),
    ("tmpfs", "/dev/shm", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", _NOSUID_NODEV_NOEXEC, "nsdelegate"),
)


def mount_filesystems() -> None:
    for source, target, fstype, flags, data in MOUNTS:
        try:
            os.makedirs(target, exist_ok=True)
            syscalls.mount(source, target, fstype, flags, data)
        except OSError as e:
            if e.errno != errno.EBUSY:  # EBUSY: /init mounted it already
                log.error("%s", e)
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                         ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2")):  # fmt: skip
        if not os.path.lexists(link):
            os.symlink(target, link)


def stamp_init_exec(timeline: Timeline) -> None:
    """Stamps "exec": when the kernel ran /init, i.e. before the interpreter started."""
    try:
        timeline.stamp_kernel_message("exec", "Run /init as init process", syscalls.read_kernel_log())
    except OSError as e:
        log.warning("no exec stamp: %s", e)


def read_module_list(listing: Path = MODULES_LIST) -> tuple[list[str], list[str]]:
    """The .ko paths of `listing` (one a line, in dependency order): those to load
    before serving, and those after the DEFERRED_MARK line, which may load while
    the agent already serves (an older list without the mark has only the first)."""
    try:
        lines = listing.read_text().splitlines()
    except FileNotFoundError:
        return [], []
    early: list[str] = []
    deferred: list[str] = []
    part = early
    for line in lines:
        path = line.strip()
        if path.startswith(DEFERRED_MARK):
            part = deferred
        elif path and not path.startswith("#"):
            part.append(path)
    return early, deferred


def load_modules(paths: Iterable[str]) -> int:
    """Loads kernel modules in the order given; a failing one is logged and skipped."""
    loaded = 0
    for path in paths:
        try:
            if syscalls.finit_module(path):
                loaded += 1
        except OSError as e:
            log.error("%s", e)
    return loaded


PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def set_page_reporting_order(cmdline: dict[str, str], parameter: Path = PAGE_REPORTING_ORDER) -> None:
    """The smallest free block the guest reports to the host, from `spinbox.page_reporting_order`.

    The kernel's own parameter cannot be given on the command line: Linux 6.1
    sets it to the balloon driver's order (2 MiB blocks on x86) when the driver
    loads, so it is written once the driver is there. Without the argument the
    kernel's choice stays.
    """
    value = cmdline.get("spinbox.page_reporting_order")
    if value is None:
        return
    if not value.isdigit():
        log.warning("ignoring spinbox.page_reporting_order=%s: not an order", value)
        return
    try:
        parameter.write_text(value)
    except OSError as e:
        log.warning("cannot set the page reporting order to %s: %s", value, e)


def start_deferred_boot(
    paths: list[str], timeline: Timeline, cmdline: dict[str, str] | None = None
) -> concurrent.futures.Future[None]:
    """Loads the deferred modules, then seeds entropy (virtio-rng is one of them),
    in a thread of the lowest priority: it takes the CPU only while the agent's
    own start waits. The future is done when the devices are all there."""
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        try:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            loaded = load_modules(paths)
            timeline.stamp("modules-deferred")
            log.info("loaded %d deferred kernel modules", loaded)
            set_page_reporting_order(cmdline or {})  # the balloon driver is loaded by now
            seed_entropy()
        finally:
            done.set_result(None)

    threading.Thread(target=run, name="deferred-boot", daemon=True).start()
    return done


def seed_entropy(hwrng: Path = Path("/dev/hwrng"), size: int = 64) -> None:
    """Credits bytes from the virtio-rng device to the kernel's pool, so getrandom() never stalls."""
    try:
        fd = os.open(hwrng, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        log.info("no hardware RNG; the kernel's pool seeds itself")
        return
    try:
        data = os.read(fd, size)
        if data:
            syscalls.add_entropy(data)
    except OSError as e:
        log.warning("could not seed entropy from %s: %s", hwrng, e)
    finally:
        os.close(fd)


SYSRQ = Path("/proc/sys/kernel/sysrq")
SYSRQ_DUMPS = 0x8  # kernel.sysrq's bit for the debugging dumps (`l`: every CPU's backtrace, `w`)


def loopback_up() -> None:
    """The loopback interface up, as in any Linux system, whether or not the VM has a network:
    a container reaches its own 127.0.0.1."""
    try:
        from guest.vminitd import network

        network.loopback_up()
    except (ImportError, OSError) as e:
        log.error("cannot bring the loopback interface up: %s", e)


def allow_sysrq_dumps(sysrq: Path = SYSRQ) -> None:
    """Lets magic SysRq's dumps through, so that the host, which alone has the serial console,
    can ask a guest that stopped answering where its CPUs are (spinbox.vm.gueststate)."""
    try:
        current = int(sysrq.read_text().strip() or "0")
        if current != 1 and not current & SYSRQ_DUMPS:
            sysrq.write_text(str(current | SYSRQ_DUMPS))
    except (OSError, ValueError) as e:
        log.warning("cannot allow magic SysRq's dumps: %s", e)


def enable_cgroup_controllers(root: Path = Path("/sys/fs/cgroup")) -> None:
    try:
        available = (root / "cgroup.controllers").read_text().split()
    except OSError as e:
        log.error("no cgroup2 hierarchy: %s", e)
        return
    wanted = [c for c in CGROUP_CONTROLLERS if c in available]
    missing = [c for c in CGROUP_CONTROLLERS if c not in available]
    if missing:
        log.warning("cgroup controllers not in this kernel: %s", ", ".join(missing))
    for controller in wanted:
        try:
            (root / "cgroup.subtree_control").write_text(f"+{controller}")
        except OSError as e:
            log.error("could not enable the %s controller: %s", controller, e)


TOOL_LAYOUT = "spinbox.tool_layout"


def fix_tool_layout(cmdline: dict[str, str]) -> bool:
    """With `spinbox.tool_layout=fixed` (set under TCG), the programs vminitd runs (crun, for
    every create, start, exec, kill and delete) load at the same addresses every time.

    TCG finds code it translated by its virtual address as well as its physical one: with
    addresses randomized, every crun run translates crun and its libraries afresh (measured:
    `crun start` 0.40 s against 0.15 s with a fixed layout). Containers' own programs keep a
    randomized layout (RuntimeConfig.default_personality). Returns whether the layout is fixed.
    """
    value = cmdline.get(TOOL_LAYOUT)
    if value is None:
        return False
    if value != "fixed":
        log.warning('ignoring %s=%s: not "fixed"', TOOL_LAYOUT, value)
        return False
    try:
        syscalls.add_personality(syscalls.ADDR_NO_RANDOMIZE)
    except OSError as e:
        log.warning("crun runs with a randomized layout: %s", e)
        return False
    return True


def kernel_cmdline(path: Path = Path("/proc/cmdline")) -> dict[str, str]:
    """`key=value` words of the kernel command line (a bare word maps to "")."""
    try:
        words = path.read_text().split()
    except OSError:
        return {}
    return {k: v for k, _, v in (w.partition("=") for w in words)}


def root_is_initramfs(mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """True when / is the initramfs, which pivot_root cannot leave (crun then needs --no-pivot)."""
    try:
        for line in mountinfo.read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[4] == "/":
                fstype = fields[fields.index("-") + 1]
                return fstype in ("rootfs", "ramfs", "tmpfs")
    except (OSError, ValueError):
        pass
    return True
