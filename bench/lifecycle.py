"""bench/lifecycle: a container's whole life (`ctr run --rm IMAGE true`) in a
spinbox VM booted cold and restored from a template, against runc, all
measured in the same run.

- spinbox: containerd 1.6 and spinbox.service (this tree) inside the tests'
  private systemd; spinboxd's boot timeline of each VM splits the wall time
  into guest boot (QEMU started to agent ready) and everything else, the
  host-side share that the shim, spinboxd and containerd account for.
- runc: Debian's containerd 1.6 with runc, outside the private systemd (runc
  needs cgroup controllers that namespace lacks), with its own root, state
  and socket under a temporary directory.
- the shim: its resident memory while serving one container, and the wall
  time of `containerd-shim-spinbox-v1 start` against a bare `python -c pass`.
  `--shim-only` measures the shim's memory alone (RSS and PSS while it serves a
  `sleep`, after execs, after the task stopped) against the RSS of a bare
  `python -c pass` of the same interpreter, in the same run.
- confinement: cold boots with QEMU unconfined (vm.confine = false: root, no
  -sandbox) interleaved with the others, for the ratio of confined to
  unconfined; and QEMU's own start (exec to QMP greeting) both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from tests.e2e.stack import BUILDS, IMAGE, RUNTIME, Containerd, spinbox_stack  # noqa: E402
from tests.harness.fixtures import artifacts_dir  # noqa: E402
from tests.harness.oci import build_image  # noqa: E402
from tests.harness.systemd import PrivateSystemd  # noqa: E402

PYTHON = Path(os.environ.get("VENV", TOP / ".venv")) / "bin" / "python"
BUS = "org.spinstack.Spinbox"
# The modes compared, each with its spinbox.toml [vm] lines: cold boot and template
# restore (QEMU confined, the default), and cold boot with QEMU unconfined.
MODES = {
    "cold": 'boot = "cold"',
    "template": 'boot = "template"',
    "unconfined": 'boot = "cold"\nconfine = false',
}
BOOTS = list(MODES)
CONFIG = "/etc/spinbox/spinbox.toml"


def guest_image() -> Path:
    from guest.mkguest.image import ImageConfig, build
    from spinbox.vm.spec import default_kernel

    output = artifacts_dir() / "guest" / "initrd.img"
    build(ImageConfig(kernel_version=default_kernel().name.removeprefix("vmlinuz-")), output)
    return output


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed


async def watch_timelines(bus_address: str, found: dict[str, dict[str, float]], stop: asyncio.Event) -> None:
    """Reads the boot timeline of every VM that exists while the runs go on."""
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio.message_bus import MessageBus

    bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
    try:
        while not stop.is_set():
            reply = await bus.call(
                Message(destination=BUS, path="/org/spinstack/Spinbox",
                        interface="org.spinstack.Spinbox.Manager", member="ListVMs")
            )  # fmt: skip
            listed = reply is not None and reply.message_type == MessageType.METHOD_RETURN and reply.body
            for path in reply.body[0] if reply is not None and listed else []:
                props = await bus.call(
                    Message(destination=BUS, path=path, interface="org.freedesktop.DBus.Properties",
                            member="Get", signature="ss", body=["org.spinstack.Spinbox.VM", "BootTimeline"])
                )  # fmt: skip
                # The VM may be gone already (an error reply).
                if props is None or props.message_type != MessageType.METHOD_RETURN:
                    continue
                if "agent-ready" in props.body[0].value:
                    found[path] = dict(props.body[0].value)
            await asyncio.sleep(0.05)
    finally:
        bus.disconnect()


async def spinbox_runs(
    systemd: PrivateSystemd, containerd: Containerd, initrd: Path, runs: int
) -> dict[str, tuple[list[float], list[dict[str, float]]]]:
    """Runs in each boot mode, interleaved (spinbox.service restarted with the mode's
    configuration before each run) so that the machine's load swings hit both alike."""
    found: dict[str, dict[str, float]] = {}
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_timelines(systemd.bus_address, found, stop))
    walls: dict[str, list[float]] = {boot: [] for boot in BOOTS}
    for n in range(runs):
        for boot in BOOTS[n % len(BOOTS) :] + BOOTS[: n % len(BOOTS)]:
            await asyncio.to_thread(set_boot, systemd, initrd, boot)
            argv = containerd.ctr_argv("run", "--rm", "--runtime", RUNTIME, IMAGE, f"bench{boot}{n}", "true")
            walls[boot].append(await asyncio.to_thread(timed, argv))
    stop.set()
    await watcher
    return {boot: (walls[boot], [t for path, t in found.items() if f"bench{boot}" in path]) for boot in BOOTS}


def set_boot(systemd: PrivateSystemd, initrd: Path, boot: str) -> None:
    """spinbox.service restarted with the mode's [vm] settings (templates stay where they are)."""
    config = f'[vm]\naccel = "tcg"\ninitrd = "{initrd}"\n{MODES[boot]}\n'
    systemd.write_file(CONFIG, config)
    systemd.systemctl("restart", "spinbox.service")
    systemd.wait_for("spinboxd on the bus", lambda: systemd.run(
        "busctl", "status", BUS, check=False).returncode == 0)  # fmt: skip


def shim_rss_kib(systemd: PrivateSystemd, containerd: Containerd) -> int:
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "bench-rss", "sleep", "600")
    try:
        (pid,) = systemd.processes("containerd-shim-spinbox-v1 .*-id bench-rss")
        status = systemd.run("cat", f"/proc/{pid}/status").stdout
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", "bench-rss", check=False)
        systemd.wait_for(
            "bench-rss to stop", lambda: containerd.tasks().get("bench-rss") != "RUNNING", timeout=60
        )
        containerd.ctr("task", "delete", "bench-rss", check=False)
        containerd.ctr("container", "delete", "bench-rss", check=False)


def smaps_kib(systemd: PrivateSystemd, pid: int) -> dict[str, int]:
    """A process's smaps_rollup totals (Rss, Pss, Anonymous ...), in KiB."""
    text = systemd.run("cat", f"/proc/{pid}/smaps_rollup").stdout
    fields = (line.split() for line in text.splitlines()[1:])
    return {f[0].rstrip(":"): int(f[1]) for f in fields if len(f) == 3}


def bare_python() -> tuple[int, str]:
    """The RSS (KiB) of `python -c pass` on the interpreter the shim runs on, and its protobuf backend."""
    rss = subprocess.run(
        [str(PYTHON), "-c", "print(open('/proc/self/status').read())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    backend = subprocess.run(
        [str(PYTHON), "-c", "from google.protobuf.internal import api_implementation as a; print(a.Type())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return int(next(line.split()[1] for line in rss.splitlines() if line.startswith("VmRSS:"))), backend


def shim_memory(
    systemd: PrivateSystemd, containerd: Containerd, name: str = "bench-shim"
) -> list[tuple[str, dict[str, int]]]:
    """The shim's memory while it serves a `sleep`, after three execs, and after its task stopped."""
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "600")
    stages = []
    try:
        (pid,) = systemd.processes(f"containerd-shim-spinbox-v1 .*-id {name}")
        time.sleep(5)
        stages.append(("serving a sleep", smaps_kib(systemd, pid)))
        for n in range(3):
            containerd.ctr("task", "exec", "--exec-id", f"e{n}", name, "sh", "-c", "echo hello; ls /")
        stages.append(("after 3 execs", smaps_kib(systemd, pid)))
        containerd.ctr("task", "kill", "-s", "KILL", name)
        systemd.wait_for(f"{name} to stop", lambda: containerd.tasks().get(name) != "RUNNING", timeout=60)
        stages.append(("its task stopped", smaps_kib(systemd, pid)))
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", name, check=False)
        systemd.wait_for(f"{name} to stop", lambda: containerd.tasks().get(name) != "RUNNING", timeout=60)
        containerd.ctr("task", "delete", name, check=False)
        containerd.ctr("container", "delete", name, check=False)
    return stages


def shim_only(initrd: Path) -> None:
    with (
        PrivateSystemd.booted(artifacts_dir() / "logs") as systemd,
        spinbox_stack(systemd, initrd, boot="cold"),
        Containerd.running(systemd, BUILDS["1.6"]) as containerd,
    ):
        stages = shim_memory(systemd, containerd)
    bare, backend = bare_python()
    print(f"the shim serving one container (containerd 1.6, {PYTHON}, protobuf backend {backend})")
    print(f"{'':<24}{'RSS MiB':>10}{'PSS MiB':>10}{'anon MiB':>10}")
    for stage, kib in stages:
        print(
            f"{stage:<24}{kib['Rss'] / 1024:>10.1f}{kib['Pss'] / 1024:>10.1f}{kib['Anonymous'] / 1024:>10.1f}"
        )
    print(f"{'bare python -c pass':<24}{bare / 1024:>10.1f}")


@contextlib.contextmanager
def host_containerd(work: Path, image: Path) -> Iterator[list[str]]:
    """Debian's containerd on the host with a private root; yields the ctr argv prefix."""
    address = work / "containerd.sock"
    config = work / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{work}/root"\nstate = "{work}/state"\n'
        f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{address}"\n'
    )
    log = (work / "containerd.log").open("wb")
    daemon = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=log, stderr=log, start_new_session=True
    )
    ctr = ["ctr", "--address", str(address)]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode != 0:
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"the host containerd did not start; see {work}/containerd.log")
            time.sleep(0.1)
        subprocess.run([*ctr, "images", "import", str(image)], capture_output=True, check=True)
        yield ctr
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        subprocess.run(["umount", "-R", str(work / "state")], capture_output=True, check=False)


async def qemu_start_costs(initrd: Path, runs: int) -> dict[bool, list[float]]:
    """QEMU's exec to its QMP greeting (no guest run), confined and not, alternating: what
    confinement adds to a VM's start without the guest boot's noise."""
    from spinbox.vm import VmSpec, default_kernel, launch

    costs: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-qemu-") as tmp:
        for n in range(runs):
            for confine in (False, True):
                spec = VmSpec(
                    vm_id=f"bench-{int(confine)}-{n}", kernel=default_kernel(), initrd=initrd,
                    runtime_dir=Path(tmp) / f"vm{n}{int(confine)}", accel="tcg", confine=confine,
                )  # fmt: skip
                vm = await launch(spec, start=False)
                costs[confine].append(vm.timeline["qmp-up"])
                await vm.kill()
    return costs


def start_path(runs: int) -> tuple[list[float], list[float]]:
    """`containerd-shim-spinbox-v1 start` (lean start-up, bind, spawn the
    server) and a bare interpreter, each run in a fresh bundle."""
    env = dict(os.environ, PYTHONPATH=str(TOP))
    starts, bare = [], []
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-start-") as tmp:
        env["SPINBOX_SHIM_SOCKET_DIR"] = f"{tmp}/s"
        for n in range(runs):
            bundle = Path(tmp) / f"b{n}"
            bundle.mkdir()
            (bundle / "config.json").write_text("{}")
            argv = [str(PYTHON), "-m", "spinbox.shim", "-namespace", "bench", "-id", f"s{n}",
                    "-address", f"{tmp}/none.sock", "start"]  # fmt: skip
            begin = time.monotonic()
            subprocess.run(argv, cwd=bundle, env=env, capture_output=True, check=True)
            starts.append(time.monotonic() - begin)
            bare.append(timed([str(PYTHON), "-c", "pass"]))
        # The servers `start` launched: each names its socket under tmp.
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError):
                if proc.name.isdigit() and f"{tmp}/s/".encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGTERM)
    return starts, bare


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/lifecycle", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--confinement-only", action="store_true", help="only QEMU's start, confined and not (no containerd)"
    )
    parser.add_argument(
        "--shim-only",
        action="store_true",
        help="only the shim's memory serving one container (containerd 1.6)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/lifecycle runs containerd and VMs: run it as root")
    initrd = guest_image()
    if args.shim_only:
        shim_only(initrd)
        return
    qemu_starts = asyncio.run(qemu_start_costs(initrd, max(args.runs, 10)))
    confined_q, unconfined_q = statistics.median(qemu_starts[True]), statistics.median(qemu_starts[False])
    print(
        f"QEMU exec to QMP up, confined: {confined_q * 1000:.0f} ms; "
        f"unconfined: {unconfined_q * 1000:.0f} ms; ratio {confined_q / unconfined_q:.3f} "
        f"({len(qemu_starts[True])} alternating starts each, medians)"
    )
    if args.confinement_only:
        return
    image = build_image(artifacts_dir() / "images" / "busybox.tar")

    with (
        tempfile.TemporaryDirectory(prefix="spinbox-bench-runc-") as tmp,
        host_containerd(Path(tmp), image) as ctr,
    ):
        runc = [timed([*ctr, "run", "--rm", IMAGE, f"runc{n}", "true"]) for n in range(args.runs)]

    rss: dict[str, int] = {}
    with (
        PrivateSystemd.booted(artifacts_dir() / "logs") as systemd,
        spinbox_stack(systemd, initrd, boot="template"),
    ):
        containerd = Containerd(systemd, BUILDS["1.6"])
        containerd.start()
        try:
            results = asyncio.run(spinbox_runs(systemd, containerd, initrd, args.runs))
            for boot in BOOTS:
                set_boot(systemd, initrd, boot)
                rss[boot] = shim_rss_kib(systemd, containerd)
        finally:
            containerd.stop()

    starts, bare = start_path(max(args.runs, 5))
    runc_s = statistics.median(runc)
    print(
        f"ctr run --rm IMAGE true, {args.runs} runs each, interleaved (medians); containerd 1.6, TCG guests"
    )
    print(f"{'':<44}{'seconds':>10}{'x runc':>10}")
    print(f"{'runc':<44}{runc_s:>10.3f}{1:>10.1f}")
    walls_s = {}
    for boot, (walls, timelines) in results.items():
        wall_s = walls_s[boot] = statistics.median(walls)
        boots = [t["agent-ready"] - t["qemu-started"] for t in timelines if "qemu-started" in t]
        boot_s = statistics.median(boots) if boots else float("nan")
        print(f"{'spinbox, ' + boot:<44}{wall_s:>10.3f}{wall_s / runc_s:>10.1f}")
        print(f"{'  qemu started to agent ready':<44}{boot_s:>10.3f}")
        print(f"{'  host-side (all but that)':<44}{wall_s - boot_s:>10.3f}")
        phases = sorted(
            {phase for t in timelines for phase in t if not phase.startswith("vm.guest-")},
            key=lambda p: statistics.median(t[p] for t in timelines if p in t),
        )
        for phase in phases:
            at = statistics.median(t[phase] for t in timelines if phase in t)
            print(f"{'    CreateVM to ' + phase:<44}{at:>10.3f}")
    print(f"ratio template / cold: {walls_s['template'] / walls_s['cold']:.2f}")
    print(f"ratio confined / unconfined (cold boot): {walls_s['cold'] / walls_s['unconfined']:.3f}")
    for boot, kib in rss.items():
        print(f"shim RSS serving one container ({boot}): {kib / 1024:.1f} MiB")
    print(
        f"shim start path: {statistics.median(starts) * 1000:.0f} ms "
        f"(bare python -c pass: {statistics.median(bare) * 1000:.0f} ms)"
    )


if __name__ == "__main__":
    main()
