"""Reaps a local Ray cluster's processes once the driver that started it has exited, however it exited.

Ray starts its GCS and raylet with the kernel's parent-death signal, and workers exit when the raylet is gone. But
after a SIGKILL of the driver, the raylet's dashboard and runtime-env agents outlive it for about a minute (they
keep trying to report to the dead GCS). `start_reaper()` launches this module as a small process of its own
(``python -m cluster.reaper TOKEN DRIVER_PID GRACE_S``) just before the driver calls ``ray.init``, and puts
``KVCOMM_LOCAL_CLUSTER=<token>`` into the driver's environment, which every process of the new cluster inherits.

The reaper reads a pipe from the driver. While the pipe is open it notes, once a second, every process that carries
the token and every descendant of those (pid and kernel start time, so a pid the kernel reuses later is never hit).
When the pipe closes (the driver exited, or `RayConnection.close()` closed it) it waits GRACE_S for a clean
shutdown to finish on its own, then SIGKILLs what is still alive among the noted processes, whatever carries the
token now, and their descendants, sweeping until a sweep finds nothing.

Why the process tree and not the token alone: Ray's agents rename themselves (setproctitle), which overwrites the
start of their ``/proc/PID/environ``, so whether the token survives there depends on the lengths of paths on the
machine. The raylet keeps its environment intact, and the agents are its children while it lives.

Nothing else is touched: not the driver, not the reaper, not processes that never carried the token or descended
from one. Linux only (``/proc``); elsewhere `start_reaper` returns None and the agents exit on their own.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid

CLUSTER_TOKEN = "KVCOMM_LOCAL_CLUSTER"
SNAPSHOT_INTERVAL_S = 1.0
SWEEP_INTERVAL_S = 0.25
MAX_SWEEPS = 80                      # 20 s of sweeping at most


def start_reaper(grace_s: float = 2.0) -> subprocess.Popen | None:
    """Start the reaper for a cluster this process is about to start, and put the token into this process's
    environment (the cluster inherits it). Close the returned process's stdin to let it sweep; None without /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != CLUSTER_TOKEN}
    reaper = subprocess.Popen([sys.executable, "-m", "cluster.reaper", token, str(os.getpid()), str(grace_s)],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)     # a Ctrl-C at the terminal does not stop it early
    os.environ[CLUSTER_TOKEN] = token
    return reaper


def stop_reaper(reaper: subprocess.Popen | None) -> None:
    """Let the reaper sweep (call it after ``ray.shutdown()``) and take the token out of this process's
    environment, so that a cluster started later gets a token of its own."""
    if reaper is not None and reaper.stdin is not None and not reaper.stdin.closed:
        reaper.stdin.close()
    os.environ.pop(CLUSTER_TOKEN, None)


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks since boot) for every live process (zombies left out: they
    are already dead, only not yet reaped by their parent)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()    # after "pid (comm) ": state, ppid, ..., field 22 = start
        if fields[0] not in (b"Z", b"X"):
            table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def carries_token(pid: int, entry: bytes) -> bool:
    """Whether `entry` (b"NAME=value") is still readable in the process's environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return entry in file.read().split(b"\0")
    except OSError:
        return False


def with_descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """`roots` and every process below them in `table`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def cluster_processes(entry: bytes, noted: dict[int, int], spare: set[int]) -> dict[int, int]:
    """pid -> start time of the cluster's live processes: noted ones (same start time), token carriers, and
    everything below them; never a pid in `spare`."""
    table = process_table()
    roots = {pid for pid, (_, start) in table.items()
             if pid not in spare and (noted.get(pid) == start or carries_token(pid, entry))}
    return {pid: table[pid][1] for pid in with_descendants(roots, table) - spare if pid in table}


def watch(token: str, driver: int, grace_s: float) -> int:
    """Note the cluster's processes until stdin closes, wait `grace_s`, then kill what is left; how many were
    killed."""
    entry, spare = f"{CLUSTER_TOKEN}={token}".encode(), {os.getpid(), driver}
    noted: dict[int, int] = {}
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin], [], [], SNAPSHOT_INTERVAL_S)
        noted.update(cluster_processes(entry, noted, spare))
        if readable and not os.read(stdin, 4096):         # EOF: the driver is gone or closed its end
            break
    time.sleep(grace_s)                                   # processes of a clean shutdown exit on their own first
    killed: set[int] = set()
    for _ in range(MAX_SWEEPS):
        left = cluster_processes(entry, noted, spare)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        noted.update(left)
        time.sleep(SWEEP_INTERVAL_S)
    return len(killed)


if __name__ == "__main__":
    watch(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
