"""containerd's stdio URIs and the host ends they name: FIFOs, files, logging programs."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from spinbox.shim.stdio import (
    Kind,
    ProcessIO,
    StdioConfig,
    StdioError,
    StdioUri,
    parse_uri,
    read_fifo,
)


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("", StdioUri(Kind.NONE)),
        ("/run/containerd/fifo/abc/t1-stdout", StdioUri(Kind.FIFO, "/run/containerd/fifo/abc/t1-stdout")),
        ("fifo:///tmp/x", StdioUri(Kind.FIFO, "/tmp/x")),
        ("file:///var/log/c.log", StdioUri(Kind.FILE, "/var/log/c.log")),
        (
            "binary:///usr/local/bin/nerdctl?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib%2Fnerdctl%2Fabc",
            StdioUri(
                Kind.BINARY, "/usr/local/bin/nerdctl", ("_NERDCTL_INTERNAL_LOGGING", "/var/lib/nerdctl/abc")
            ),
        ),
        ("binary:///bin/logger?--flag", StdioUri(Kind.BINARY, "/bin/logger", ("--flag",))),
    ],
)
def test_parse_uri(uri: str, parsed: StdioUri) -> None:
    assert parse_uri(uri) == parsed


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://example/x", "unsupported stdio URI"),
        ("file://host/x", "names a host"),
        ("binary:relative", "absolute path"),
    ],
)
def test_bad_uris_are_rejected(uri: str, message: str) -> None:
    with pytest.raises(StdioError, match=message):
        parse_uri(uri)


def test_stdin_must_be_a_fifo_and_binary_takes_both_streams() -> None:
    with pytest.raises(StdioError, match="stdin must be a FIFO"):
        StdioConfig.parse("file:///x", "", "", False)
    with pytest.raises(StdioError, match="both stdout and stderr"):
        StdioConfig.parse("", "binary:///a", "/some/fifo", False)
    config = StdioConfig.parse("", "binary:///a", "binary:///a", False)
    assert config.stdout.kind == Kind.BINARY


def test_fifo_output_reaches_containerd_side(tmp_path: Path) -> None:
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)

    async def scenario() -> bytes:
        # containerd opens the read side first, non-blocking.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        io = await ProcessIO.open(StdioConfig.parse("", str(fifo), "", False), "c1", "default")
        assert io.stdout is not None and io.stderr is None
        await io.stdout.write(b"hello ")
        await io.stdout.write(b"world")
        await io.close()
        os.set_blocking(reader, True)
        data = b""
        while chunk := os.read(reader, 4096):
            data += chunk
        os.close(reader)
        return data

    assert asyncio.run(scenario()) == b"hello world"


def test_stdin_fifo_waits_for_its_writer_then_ends_at_eof(tmp_path: Path) -> None:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)

    async def scenario() -> list[bytes]:
        received: list[bytes] = []

        async def consume() -> None:
            async for chunk in read_fifo(str(fifo)):
                received.append(chunk)

        consumer = asyncio.create_task(consume())
        # No writer yet: no premature end of file.
        await asyncio.sleep(0.05)
        assert not consumer.done()
        writer = await asyncio.to_thread(os.open, fifo, os.O_WRONLY)
        os.write(writer, b"hi\n")
        os.close(writer)
        await consumer
        return received

    assert b"".join(asyncio.run(scenario())) == b"hi\n"


def test_file_uri_appends_stdout_and_stderr(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "c.log"
    log.parent.mkdir()
    log.write_bytes(b"before\n")
    uri = f"file://{log}"

    async def scenario() -> None:
        io = await ProcessIO.open(StdioConfig.parse("", uri, uri, False), "c1", "default")
        assert io.stdout is not None and io.stderr is io.stdout
        await io.stdout.write(b"out\n")
        await io.stderr.write(b"err\n")
        await io.close()

    asyncio.run(scenario())
    assert log.read_bytes() == b"before\nout\nerr\n"


LOGGER = """#!/bin/sh
# A logging program per containerd's contract: stdout on fd 3, stderr on fd 4,
# readiness by closing fd 5.
dir=$2
echo "$CONTAINER_NAMESPACE/$CONTAINER_ID" > "$dir/who"
cat <&3 > "$dir/out" 5>&- &
cat <&4 > "$dir/err" 5>&- &
exec 5>&-
wait
"""


def test_binary_uri_runs_the_logging_program(tmp_path: Path) -> None:
    logger = tmp_path / "logger.sh"
    logger.write_text(LOGGER)
    logger.chmod(logger.stat().st_mode | stat.S_IXUSR)
    uri = f"binary://{logger}?--dir={tmp_path}"

    async def scenario() -> None:
        io = await ProcessIO.open(StdioConfig.parse("", uri, uri, False), "c1", "ns1")
        assert io.stdout is not None and io.stderr is not None
        await io.stdout.write(b"to stdout\n")
        await io.stderr.write(b"to stderr\n")
        # Closing waits for the program to finish with its input.
        await io.close()

    asyncio.run(scenario())
    assert (tmp_path / "out").read_bytes() == b"to stdout\n"
    assert (tmp_path / "err").read_bytes() == b"to stderr\n"
    assert (tmp_path / "who").read_text() == "ns1/c1\n"


def test_missing_logging_program_is_a_clear_error(tmp_path: Path) -> None:
    uri = f"binary://{tmp_path}/nope"

    async def scenario() -> None:
        await ProcessIO.open(StdioConfig.parse("", uri, uri, False), "c1", "ns1")

    with pytest.raises(StdioError, match="cannot start the logging program"):
        asyncio.run(scenario())
