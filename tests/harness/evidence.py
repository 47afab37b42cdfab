"""What a failed test leaves for whoever reads its report: the private
systemd's journal (export format, readable with `journalctl --file` after
`systemd-journal-remote`, or as text), spinboxd's state directories, and the
namespace's units, mounts, processes, links and iptables rules.

Everything is taken from the namespace while it still runs, before the
session's teardown kills it, and lands under the test artifacts directory in
a directory named after the test."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

from tests.harness.systemd import PrivateSystemd

STATE_DIRS = ("/run/spinbox", "/var/lib/spinbox")
# Disk images and cached layers are large and rarely what explains a failure:
# their names, sizes and modes are listed, their contents copied only when small.
MAX_COPIED_FILE = 1 << 20
JOURNAL_TIMEOUT = 60


def evidence_dir(base: Path, name: str) -> Path:
    """A fresh directory under `base` named after `name` (a test id) and the time."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-120:] or "test"
    path = base / "evidence" / f"{slug}-{time.strftime('%Y%m%dT%H%M%S')}"
    suffix = 0
    while path.exists():
        suffix += 1
        path = path.with_name(f"{path.name}.{suffix}")
    path.mkdir(parents=True)
    return path


def save_journal(systemd: PrivateSystemd, target: Path) -> list[str]:
    """journalctl -o export (all of it) and a short-precise text copy; returns the problems met."""
    problems = []
    for name, fmt in (("journal.export", "export"), ("journal.txt", "short-precise")):
        with open(target / name, "wb") as out:
            try:
                result = subprocess.run(
                    systemd.nsenter("journalctl", "--no-pager", "-o", fmt),
                    stdout=out,
                    stderr=subprocess.PIPE,
                    timeout=JOURNAL_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                problems.append(f"journalctl -o {fmt} did not finish in {JOURNAL_TIMEOUT}s")
                continue
        if result.returncode != 0:
            problems.append(f"journalctl -o {fmt} exited {result.returncode}: {result.stderr.decode()[:500]}")
    return problems


def save_tree(source: Path, target: Path) -> list[str]:
    """Copy `source` into `target` (small regular files only) and write
    `target`.listing with every entry's type, mode, size and name."""
    lines: list[str] = []
    problems: list[str] = []
    if not source.exists():
        return [f"{source} does not exist"]
    for root, dirs, files in os.walk(source, followlinks=False):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            relative = path.relative_to(source)
            try:
                info = path.lstat()
            except OSError as error:
                problems.append(f"{relative}: {error.strerror}")
                continue
            kind = stat.filemode(info.st_mode)
            lines.append(f"{kind} {info.st_size:>12} {relative}")
            if not stat.S_ISREG(info.st_mode):
                continue
            if info.st_size > MAX_COPIED_FILE:
                continue
            copy = target / relative
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(path, copy)
            except OSError as error:
                problems.append(f"{relative}: {error.strerror}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_name(target.name + ".listing").write_text("\n".join(lines) + "\n")
    return problems


def save_evidence(systemd: PrivateSystemd, base: Path, name: str) -> Path:
    """The journal and spinboxd's state directories of `systemd`, saved under
    `base`/evidence/; returns the directory written."""
    target = evidence_dir(base, name)
    problems = save_journal(systemd, target)
    for inside in STATE_DIRS:
        problems += save_tree(systemd.path(inside), target / inside.strip("/").replace("/", "-"))
    units = systemd.run("systemctl", "list-units", "--all", "--plain", "--no-legend", check=False, timeout=30)
    (target / "units.txt").write_text(units.stdout)
    mounts = systemd.run("findmnt", "-rn", check=False, timeout=30)
    (target / "mounts.txt").write_text(mounts.stdout)
    processes = systemd.run("ps", "-eo", "pid,ppid,stat,etime,rss,args", check=False, timeout=30)
    (target / "processes.txt").write_text(processes.stdout)
    # Every thread's CPU time and name: QEMU names its vCPU threads ("CPU 1/TCG"), so a guest
    # that spins shows which of its vCPUs does.
    threads = systemd.run("ps", "-eLo", "pid,tid,stat,time,comm", check=False, timeout=30)
    (target / "threads.txt").write_text(threads.stdout)
    rules = systemd.run("iptables-save", check=False, timeout=30)
    (target / "iptables.txt").write_text(rules.stdout + rules.stderr)
    links = systemd.run("ip", "-d", "link", "show", check=False, timeout=30)
    (target / "links.txt").write_text(links.stdout)
    if problems:
        (target / "problems.txt").write_text("\n".join(problems) + "\n")
    return target
