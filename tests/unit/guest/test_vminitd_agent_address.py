"""Agent addresses as the host writes them."""

from __future__ import annotations

import pytest

from spinbox.agent import AgentAddress


def test_parse() -> None:
    assert AgentAddress.parse("unix:/run/x.sock") == AgentAddress("unix", path="/run/x.sock")
    assert AgentAddress.parse("vsock:3:1024") == AgentAddress("vsock", cid=3, port=1024)
    assert str(AgentAddress.parse("vsock:3:1024")) == "vsock:3:1024"


@pytest.mark.parametrize("bad", ["", "unix:", "/run/x.sock", "vsock:3", "vsock:x:1", "tcp:1.2.3.4:5"])
def test_bad(bad: str) -> None:
    with pytest.raises(ValueError, match="neither"):
        AgentAddress.parse(bad)
