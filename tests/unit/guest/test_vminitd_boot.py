"""The pure parts of vminitd's boot and channels: command line, mounts, sysfs lookups, logs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from guest.vminitd import boot, channels
from guest.vminitd.reaper import exit_code
from guest.vminitd.rootfs import find_device
from guest.vminitd.timeline import Timeline
from spinbox.ttrpc import TtrpcError


def test_kernel_cmdline(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 quiet spinbox.vm=abc spinbox.agent=vsock:1024 a=b=c\n")
    args = boot.kernel_cmdline(cmdline)
    assert args["spinbox.vm"] == "abc"
    assert args["spinbox.agent"] == "vsock:1024"
    assert args["quiet"] == ""
    assert args["a"] == "b=c"
    assert boot.kernel_cmdline(tmp_path / "missing") == {}


def test_root_is_initramfs(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("1 1 0:2 / / rw - rootfs rootfs rw\n22 1 0:5 / /proc rw - proc proc rw\n")
    assert boot.root_is_initramfs(info)
    info.write_text("25 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n")
    assert not boot.root_is_initramfs(info)


def test_module_list_missing_is_fine(tmp_path: Path) -> None:
    assert boot.read_module_list(tmp_path / "none") == ([], [])
    assert boot.load_modules([]) == 0


def test_module_list_parts(tmp_path: Path) -> None:
    listing = tmp_path / "modules"
    listing.write_text("/a.ko\n# a comment\n\n/b.ko\n# deferred: later\n/c.ko\n")
    assert boot.read_module_list(listing) == (["/a.ko", "/b.ko"], ["/c.ko"])
    listing.write_text("/a.ko\n/b.ko\n")  # an image built before the mark existed
    assert boot.read_module_list(listing) == (["/a.ko", "/b.ko"], [])


def test_find_port(tmp_path: Path) -> None:
    for name, port in (("vport1p1", "spinbox.log"), ("vport1p2", "spinbox.agent")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "name").write_text(port + "\n")
    assert channels.find_port("spinbox.agent", tmp_path, Path("/dev")) == Path("/dev/vport1p2")
    assert channels.find_port("spinbox.control", tmp_path, Path("/dev")) is None


def test_find_device(tmp_path: Path) -> None:
    for name, serial in (("vda", "layer0"), ("vdb", "upper")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "serial").write_text(serial)
    (tmp_path / "loop0").mkdir()
    assert find_device("upper", tmp_path, Path("/dev")) == Path("/dev/vdb")
    with pytest.raises(TtrpcError, match="serial 'nope'"):
        find_device("nope", tmp_path, Path("/dev"))


def test_exit_codes() -> None:
    assert exit_code(3 << 8) == 3
    assert exit_code(15) == 143  # killed by SIGTERM
    assert exit_code(9) == 137


def test_log_priorities() -> None:
    assert channels.priority(logging.ERROR) == 3
    assert channels.priority(logging.WARNING) == 4
    assert channels.priority(logging.INFO) == 6
    assert channels.priority(logging.DEBUG) == 7
    assert channels.priority(logging.CRITICAL + 10) == 2


def test_log_handler_buffers_without_blocking() -> None:
    handler = channels.PortLogHandler(capacity=3)
    logger = logging.getLogger("test-vminitd-buffer")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(5):
            logger.warning("line %d\nsecond", i)
    finally:
        logger.removeHandler(handler)
    assert list(handler.lines) == [b"<4>line 2\n second\n", b"<4>line 3\n second\n", b"<4>line 4\n second\n"]
    assert handler.dropped == 2


def test_timeline_keeps_the_first_stamp() -> None:
    t = Timeline()
    t.stamp("entry")
    first = t.stamps["entry"]
    t.stamp("entry")
    assert t.stamps["entry"] == first > 0


def test_kernel_message_stamp() -> None:
    log = (
        "<6>[    0.500000] Run /init as init process\n"
        "<6>[    2.953722] Run /init as init process\n"
        "<6>[    3.100000] virtio_blk virtio1: [vda] 2048 512-byte logical blocks\n"
    )
    t = Timeline()
    t.stamp_kernel_message("exec", "Run /init as init process", log)
    assert t.stamps["exec"] == 2_953_722_000
    t.stamp_kernel_message("missing", "Run /sbin/init as init process", log)
    t.stamp_kernel_message("garbled", "x", "<6>[  abc] x\n")
    assert "missing" not in t.stamps and "garbled" not in t.stamps


def test_logging_after_the_event_loop_closed_is_no_logging_error(tmp_path: Path) -> None:
    handler = channels.PortLogHandler()
    port = tmp_path / "port"
    port.write_bytes(b"")

    async def run_briefly() -> None:
        task = asyncio.ensure_future(handler.run(port))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(run_briefly())
    errors: list[logging.LogRecord] = []
    handler.handleError = errors.append  # type: ignore[method-assign]
    handler.emit(logging.LogRecord("vminitd", logging.INFO, __file__, 1, "powering off", None, None))
    assert errors == []
    assert handler.lines[-1].endswith(b"powering off\n")


def test_the_page_reporting_order_comes_from_the_command_line(tmp_path: Path) -> None:
    parameter = tmp_path / "page_reporting_order"
    parameter.write_text("9")
    boot.set_page_reporting_order({"spinbox.vm": "vm1"}, parameter)
    assert parameter.read_text() == "9"
    boot.set_page_reporting_order({"spinbox.page_reporting_order": "x"}, parameter)
    assert parameter.read_text() == "9"
    boot.set_page_reporting_order({"spinbox.page_reporting_order": "0"}, parameter)
    assert parameter.read_text() == "0"
    # No balloon driver (no page_reporting parameter): logged, not fatal.
    boot.set_page_reporting_order({"spinbox.page_reporting_order": "0"}, tmp_path / "absent" / "order")


def test_sysrq_dumps_are_allowed_for_the_host(tmp_path: Path) -> None:
    sysrq = tmp_path / "sysrq"
    sysrq.write_text("438\n")  # Debian's default: no debugging dumps
    boot.allow_sysrq_dumps(sysrq)
    assert sysrq.read_text() == "446"
    for kept in ("1", "446"):  # everything, or the dumps already
        sysrq.write_text(kept)
        boot.allow_sysrq_dumps(sysrq)
        assert sysrq.read_text() == kept
    boot.allow_sysrq_dumps(tmp_path / "missing")  # logged, not raised
