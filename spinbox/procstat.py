"""/proc/<pid>/stat, read once for everyone: a process's state and start time."""

from __future__ import annotations


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat from the third on (state, ppid, ...); None without the process.

    The second field (the command name in parentheses) may itself hold spaces
    and parentheses: the fields that follow start after the last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, to tell a pid from its reuse."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None
