"""Where systemd is not PID 1 (containers, chroots, this project's machines),
`apt install` of the package still succeeds: the units are enabled for a
later boot, nothing is started, and the guest image is built. Runs in a
private mount namespace whose /etc, /usr and /var are overlays."""

from __future__ import annotations

import subprocess

from tests.harness.deb import SpinboxDeb

# Runs as root in a new mount namespace; the overlays' upper layers are in a
# tmpfs that vanishes with it.
_SCRIPT = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs tmpfs /run
# Taken before the private /tmp hides it (the tree may live under /tmp).
cp "$1" /run/spinbox.deb
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/.deb
for d in etc usr var; do
    mkdir -p /run/.deb/$d/upper /run/.deb/$d/work
    mount -t overlay overlay -o lowerdir=/$d,upperdir=/run/.deb/$d/upper,workdir=/run/.deb/$d/work /$d
done
rm -f /var/lib/man-db/auto-update
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends /run/spinbox.deb
echo "state: $(dpkg-query -W -f='${db:Status-Abbrev}' spinbox)"
for f in /var/lib/spinbox/guest/initrd.img /etc/systemd/system/multi-user.target.wants/spinbox.service; do
    [ -e "$f" ] && echo "exists: $f"
done
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q spinbox
echo "purged: $(dpkg-query -W -f='${db:Status-Abbrev}' spinbox 2>/dev/null || echo none)"
"""


def test_install_and_purge_without_systemd(spinbox_deb: SpinboxDeb) -> None:
    result = subprocess.run(
        ["unshare", "--mount", "--fork", "sh", "-c", _SCRIPT, "sh", str(spinbox_deb.path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "state: ii" in result.stdout
    if "/lib/systemd/system/spinbox.service" in spinbox_deb.files:
        assert "exists: /etc/systemd/system/multi-user.target.wants/spinbox.service" in result.stdout
    if "/usr/bin/spinbox-mkguest" in spinbox_deb.files:
        assert "exists: /var/lib/spinbox/guest/initrd.img" in result.stdout
    assert "purged: none" in result.stdout or "purged: un" in result.stdout
