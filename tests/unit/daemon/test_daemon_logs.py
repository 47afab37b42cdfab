"""Log lines as the journal gets them: priorities from vminitd, clean console text."""

from __future__ import annotations

from spinbox.daemon.logs import _clean, split_priority


def test_priority_prefix_is_split_off() -> None:
    assert split_priority(b"<3>mount failed") == (3, b"mount failed")
    assert split_priority(b"no prefix", default=6) == (6, b"no prefix")
    assert split_priority(b"<9>not a priority", default=6) == (6, b"<9>not a priority")


def test_console_escapes_are_removed() -> None:
    assert _clean(b"\x1b[2J\x1b[01;01HSeaBIOS (version 1.16)\r\n") == "SeaBIOS (version 1.16)"
    assert _clean(b"tab\there\x07") == "tab\there"
    assert _clean(b"caf\xc3\xa9 \xff") == "caf\u00e9 \ufffd"
