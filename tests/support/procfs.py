"""Reading /proc for the tests that check which processes a run leaves behind (Linux only).

Independent of `cluster.reaper` on purpose: the tests that judge the reaper do not share its code."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessStat:
    pid: int
    name: str          # the kernel's command name (15 characters at most)
    ppid: int
    session: int
    start: int         # start time in clock ticks since boot: with the pid, names one process for good


def process_stat(pid: int) -> ProcessStat | None:
    """The process's /proc/PID/stat, or None when it is gone or a zombie (dead, only not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    close = stat.rfind(b")")                       # the name may itself contain ")"
    fields = stat[close + 2:].split()              # field 3 (state) on: state, ppid, pgrp, session, ... start (22)
    if fields[0] in (b"Z", b"X"):
        return None
    return ProcessStat(pid, stat[stat.find(b"(") + 1:close].decode(errors="replace"), int(fields[1]),
                       int(fields[3]), int(fields[19]))


def running_processes() -> dict[int, ProcessStat]:
    """Every live process but this one."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            stat = process_stat(int(entry))
            if stat is not None:
                found[stat.pid] = stat
    return found
