"""A bad /etc/spinbox/spinbox.toml stops spinbox.service with a sentence naming the key."""

from __future__ import annotations

from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import installed


def test_a_bad_config_file_stops_the_service_naming_the_key(systemd: PrivateSystemd) -> None:
    with installed(systemd, config='[vm]\naccel = "xen"\n'):
        result = systemd.systemctl("start", "spinbox.service", check=False)
        assert result.returncode != 0
        assert systemd.unit_property("spinbox.service", "ActiveState") == "failed"
        assert systemd.unit_property("spinbox.service", "ExecMainStatus") == "78"
        journal = systemd.journal("-u", "spinbox.service", "-o", "cat")
        assert "vm.accel must be one of auto, kvm, tcg, not 'xen'" in journal
