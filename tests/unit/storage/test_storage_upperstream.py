"""The writable layer's stream: the guest's writer against the host's extractor, and hostile streams."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest.vminitd import upperstream as guest_stream
from spinbox.api import upper_format as wire
from spinbox.storage.errors import SnapshotGone
from spinbox.storage.upperstream import Limits, UnsafeUpper, receive

WHAT = "the writable layer of container c1"
BIG = Limits(max_bytes=1 << 30)


# -- crafting streams ---------------------------------------------------------


def record(kind: int, payload: bytes) -> bytes:
    return wire.RECORD_HEAD.pack(kind, len(payload)) + payload


def entry(
    path: bytes,
    kind: int = wire.Kind.REGULAR,
    mode: int = 0o644,
    size: int = 0,
    target: bytes = b"",
    xattrs: Iterable[tuple[bytes, bytes]] = (),
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_700_000_000_123_456_789,
) -> bytes:
    pairs = list(xattrs)
    body = wire.ENTRY_HEAD.pack(kind, mode, uid, gid, mtime, mtime, size)
    body += wire.U16.pack(len(path)) + path + wire.U16.pack(len(target)) + target + wire.U16.pack(len(pairs))
    for name, value in pairs:
        body += wire.U8.pack(len(name)) + name + wire.U32.pack(len(value)) + value
    return record(wire.RecordType.ENTRY, body)


def data(offset: int, content: bytes) -> bytes:
    return record(wire.RecordType.DATA, wire.DATA_HEAD.pack(offset) + content)


def end(entries: int, total: int) -> bytes:
    return record(wire.RecordType.END, wire.END_BODY.pack(entries, total))


HEAD = wire.MAGIC + wire.U8.pack(wire.VERSION)
ROOT = entry(b"", wire.Kind.DIRECTORY, 0o755)


def stream(*records: bytes, entries: int | None = None, total: int = 0) -> bytes:
    count = sum(1 for r in records if r[0] == wire.RecordType.ENTRY) + 1
    return HEAD + ROOT + b"".join(records) + end(count if entries is None else entries, total)


def listing(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under root with its type, mode and content or target."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(directory, name)
            st_ = path.lstat()
            body = b""
            if stat.S_ISREG(st_.st_mode):
                body = path.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                body = os.fsencode(os.readlink(path))
            found[str(path.relative_to(root))] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), body)
    return found


class Place:
    """A snapshot directory holding the upper dir, with a sentinel tree beside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.upper = root / "snap/fs"
        self.upper.mkdir(parents=True)
        (self.upper / "kept").write_text("before\n")
        self.outside = root / "outside"
        self.outside.mkdir()
        (self.outside / "secret").write_text("host\n")
        self.before = listing(root)

    def unchanged(self) -> bool:
        return listing(self.root) == self.before


async def chunks_of(blob: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for at in range(0, len(blob), size):
        yield blob[at : at + size]


def receive_blob(place: Place, blob: bytes, limits: Limits = BIG, size: int = 7) -> None:
    asyncio.run(receive(chunks_of(blob, size), place.upper, limits, WHAT))


# -- a real tree, written by the guest's side ---------------------------------


def make_tree(root: Path) -> None:
    root.mkdir()
    (root / "etc").mkdir(mode=0o755)
    (root / "etc/motd").write_text("hello\n")
    os.chown(root / "etc/motd", 42, 43)
    os.setxattr(root / "etc/motd", "trusted.note", b"kept")
    os.setxattr(root / "etc/motd", "trusted.overlay.origin", b"guest handle")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF")
    os.chmod(root / "bin/tool", 0o4755)
    os.mknod(root / "bin/gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (root / "opaque").mkdir()
    os.setxattr(root / "opaque", "trusted.overlay.opaque", b"y")
    os.link(root / "etc/motd", root / "opaque/motd-link")
    os.symlink("/etc/shadow", root / "shadow-link")
    os.mkfifo(root / "fifo", 0o640)
    with open(root / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"tail")
    os.utime(root / "etc/motd", ns=(1, 1_600_000_000_987_654_321))
    os.utime(root / "etc", ns=(2, 1_500_000_000_000_000_007))


def test_a_real_upper_arrives_exactly(tmp_path: Path) -> None:
    source = tmp_path / "guest-upper"
    make_tree(source)
    place = Place(tmp_path / "host")
    blob = b"".join(guest_stream.pieces(source))
    assert len(blob) < 1 << 20  # the sparse file's hole is not sent
    receive_blob(place, blob, size=4096)
    upper = place.upper
    assert not (upper / "kept").exists()  # the layer replaces what was there
    assert listing(upper) == listing(source)
    motd = (upper / "etc/motd").lstat()
    assert (motd.st_uid, motd.st_gid, motd.st_mtime_ns) == (42, 43, 1_600_000_000_987_654_321)
    assert (upper / "etc").lstat().st_mtime_ns == 1_500_000_000_000_000_007
    assert os.getxattr(upper / "etc/motd", "trusted.note") == b"kept"
    assert "trusted.overlay.origin" not in os.listxattr(upper / "etc/motd")
    assert os.getxattr(upper / "opaque", "trusted.overlay.opaque") == b"y"
    assert motd.st_ino == (upper / "opaque/motd-link").lstat().st_ino
    assert stat.S_IMODE((upper / "bin/tool").lstat().st_mode) == 0o4755
    gone = (upper / "bin/gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert (upper / "sparse").stat().st_blocks * 512 < 1 << 20
    assert not [p for p in upper.parent.iterdir() if p.name != "fs"]  # no staging left
    assert (place.outside / "secret").read_text() == "host\n"


def test_a_layer_whose_snapshot_was_removed_meanwhile_says_so(tmp_path: Path) -> None:
    """containerd removes a deleted container's snapshot; a layer still on its way has nowhere to go."""
    source = tmp_path / "guest-upper"
    source.mkdir()
    (source / "file").write_text("late\n")
    place = Place(tmp_path / "host")

    async def removed_on_the_way() -> AsyncIterator[bytes]:
        # The receiver has made its staging directory before it asks for the first piece.
        shutil.rmtree(place.upper.parent)
        for piece in guest_stream.pieces(source):
            yield piece

    with pytest.raises(SnapshotGone, match=r"its snapshot .*snap was removed"):
        asyncio.run(receive(removed_on_the_way(), place.upper, BIG, WHAT))
    # Removed before the layer started to arrive.
    with pytest.raises(SnapshotGone, match=r"its snapshot .*snap was removed"):
        receive_blob(place, b"".join(guest_stream.pieces(source)))
    assert (place.outside / "secret").read_text() == "host\n"


def test_an_in_place_edit_keeping_size_and_mtime_arrives(tmp_path: Path) -> None:
    source = tmp_path / "guest-upper"
    source.mkdir()
    (source / "file").write_text("aaaa")
    place = Place(tmp_path / "host")
    receive_blob(place, b"".join(guest_stream.pieces(source)))
    stamp = (source / "file").stat().st_mtime_ns
    (source / "file").write_text("bbbb")
    os.utime(source / "file", ns=(stamp, stamp))
    receive_blob(place, b"".join(guest_stream.pieces(source)))
    assert (place.upper / "file").read_text() == "bbbb"


def test_a_device_node_in_the_guest_fails_the_export_by_name(tmp_path: Path) -> None:
    source = tmp_path / "guest-upper"
    source.mkdir()
    os.mknod(source / "sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    with pytest.raises(guest_stream.ExportError, match="/sda is a block device node"):
        list(guest_stream.pieces(source))


# -- hostile streams ----------------------------------------------------------

HOSTILE = {
    "dot-dot": (stream(entry(b"../outside/secret", size=1), data(0, b"x"), total=1), "escapes"),
    "dot-dot-inside": (stream(entry(b"a/../../x")), "escapes"),
    "absolute": (stream(entry(b"/etc/passwd")), "escapes"),
    "nul": (stream(entry(b"a\0b")), "escapes"),
    "empty-name": (stream(entry(b"a//b")), "escapes"),
    "through-symlink": (
        stream(
            entry(b"out", wire.Kind.SYMLINK, target=b"../../outside"), entry(b"out/secret", size=1), total=1
        ),
        "not a directory",
    ),
    "symlink-then-dir": (
        stream(entry(b"out", wire.Kind.SYMLINK, target=b"/"), entry(b"out/etc", wire.Kind.DIRECTORY)),
        "not a directory",
    ),
    "parent-not-sent": (stream(entry(b"missing/file")), "not a directory"),
    "device": (stream(entry(b"sda", 8)), "device nodes are refused"),
    "sparse-beyond-cap": (stream(entry(b"big", size=(1 << 30) + 1)), "cap of"),
    "twice": (stream(entry(b"a"), entry(b"a")), "twice"),
    "hardlink-out": (stream(entry(b"l", wire.Kind.HARDLINK, target=b"../outside/secret")), "escapes"),
    "hardlink-to-symlink": (
        stream(
            entry(b"s", wire.Kind.SYMLINK, target=b"/etc/shadow"),
            entry(b"l", wire.Kind.HARDLINK, target=b"s"),
        ),
        "not a regular file",
    ),
    "hardlink-unsent": (stream(entry(b"l", wire.Kind.HARDLINK, target=b"nothing")), "did not send"),
    "data-beyond-size": (stream(entry(b"f", size=2), data(0, b"xyz"), total=2), "beyond its size"),
    "data-backwards": (
        stream(entry(b"f", size=4), data(2, b"xy"), data(0, b"ab"), total=4),
        "out of order",
    ),
    "data-without-file": (stream(entry(b"d", wire.Kind.DIRECTORY), data(0, b"x")), "follows no regular file"),
    "xattr-namespace": (stream(entry(b"f", xattrs=[(b"system.sockprotoname", b"x")])), "name spaces"),
    "bad-mode": (stream(entry(b"f", mode=0o170000)), "invalid mode"),
    "wrong-count": (stream(entry(b"f"), entries=7), "announced"),
    "cut-short": (stream(entry(b"f"))[:-3], "cut short"),
    "no-end": (HEAD + ROOT + entry(b"f"), "cut short"),
    "after-end": (stream() + entry(b"late"), "after its end"),
    "not-root-first": (HEAD + entry(b"f") + end(1, 0), "top directory"),
    "bad-magic": (b"TAR!" + stream()[4:], "format"),
    "new-version": (wire.MAGIC + wire.U8.pack(wire.VERSION + 1), "version"),
    "huge-record": (HEAD + wire.RECORD_HEAD.pack(wire.RecordType.DATA, 1 << 30), "over the limit"),
    "unknown-record": (HEAD + ROOT + record(9, b""), "unknown type"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_stream_is_refused_and_writes_nothing(tmp_path: Path, name: str) -> None:
    blob, message = HOSTILE[name]
    place = Place(tmp_path)
    with pytest.raises(UnsafeUpper, match=message) as raised:
        receive_blob(place, blob)
    assert WHAT in str(raised.value) or "the writable layer" in str(raised.value)
    assert place.unchanged()


def test_the_entry_cap_is_enforced(tmp_path: Path) -> None:
    place = Place(tmp_path)
    blob = stream(*(entry(f"f{n}".encode()) for n in range(10)))
    with pytest.raises(UnsafeUpper, match="more than 5 entries"):
        receive_blob(place, blob, Limits(max_bytes=1 << 20, max_entries=5))
    assert place.unchanged()


def test_the_byte_cap_counts_every_file(tmp_path: Path) -> None:
    place = Place(tmp_path)
    blob = stream(entry(b"a", size=600), entry(b"b", size=600), total=1200)
    with pytest.raises(UnsafeUpper, match="cap of 1000 bytes at /b"):
        receive_blob(place, blob, Limits(max_bytes=1000))
    assert place.unchanged()


def test_symlinks_to_anywhere_are_data_not_followed(tmp_path: Path) -> None:
    place = Place(tmp_path)
    blob = stream(entry(b"passwd", wire.Kind.SYMLINK, mode=0o777, target=b"../../outside/secret", uid=7))
    receive_blob(place, blob)
    assert os.readlink(place.upper / "passwd") == "../../outside/secret"
    assert (place.upper / "passwd").lstat().st_uid == 7
    assert (place.outside / "secret").lstat().st_uid == 0


# -- fuzzing ------------------------------------------------------------------

_names = st.sampled_from([b"a", b"b", b"..", b".", b"", b"/", b"a/b", b"\0", b"../outside", b"a/.."])
_entries = st.builds(
    entry,
    path=st.lists(_names, min_size=1, max_size=3).map(b"/".join),
    kind=st.integers(0, 9),
    mode=st.sampled_from([0o644, 0o4755, 0o777, 0o170000]),
    size=st.integers(0, 64),
    target=st.sampled_from([b"", b"a", b"/", b"../outside/secret", b"a/b"]),
    xattrs=st.lists(
        st.tuples(
            st.sampled_from([b"trusted.x", b"user.overlay.opaque", b"bad", b""]), st.binary(max_size=8)
        ),
        max_size=2,
    ),
)
_records = st.one_of(
    _entries,
    st.builds(data, st.integers(0, 70), st.binary(max_size=16)),
    st.builds(end, st.integers(0, 8), st.integers(0, 200)),
    st.binary(max_size=12),
)
_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_refused_or_inside(tmp_path: Path, blob: bytes, size: int) -> None:
    root = tmp_path / os.urandom(6).hex()
    place = Place(root)
    try:
        receive_blob(place, blob, Limits(max_bytes=1000, max_entries=20), size)
    except UnsafeUpper:
        assert place.unchanged()
    else:
        # Accepted: the whole tree is inside the snapshot's upper directory.
        assert (place.outside / "secret").read_text() == "host\n"
        assert sorted(p.name for p in root.iterdir()) == ["outside", "snap"]
        assert sorted(p.name for p in (root / "snap").iterdir()) == ["fs"]


@_fuzz
@given(records=st.lists(_records, max_size=8), size=st.integers(1, 64))
def test_fuzzed_streams_are_refused_or_stay_inside(tmp_path: Path, records: list[bytes], size: int) -> None:
    _only_refused_or_inside(tmp_path, HEAD + ROOT + b"".join(records), size)


@_fuzz
@given(
    cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=4)
)
def test_damaged_real_streams_are_refused_or_stay_inside(
    tmp_path: Path, cut: int, flips: list[tuple[int, int]]
) -> None:
    blob = bytearray(
        stream(
            entry(b"d", wire.Kind.DIRECTORY),
            entry(b"d/f", size=5),
            data(0, b"hello"),
            entry(b"d/l", wire.Kind.HARDLINK, target=b"d/f"),
            entry(b"s", wire.Kind.SYMLINK, target=b"../outside"),
            total=5,
        )
    )
    for at, value in flips:
        if at < len(blob):
            blob[at] ^= value
    _only_refused_or_inside(tmp_path, bytes(blob[: len(blob) - cut % max(1, len(blob))]), 13)
