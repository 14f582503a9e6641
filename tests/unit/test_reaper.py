"""`cluster.reaper`: after the driver dies, the processes of its cluster die too, even one whose environment no
longer shows the token (Ray's agents overwrite theirs when they rename themselves); nothing else is touched.

Real processes stand in for Ray's: a "driver" starts the reaper, then a "raylet" (inherits the token) that starts an
"agent" whose environment lacks the token, and a "bystander" child started without the token.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procfs import process_stat

REPO = Path(__file__).resolve().parents[2]
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]

RAYLET = """
import os, subprocess, sys, time
from cluster.reaper import CLUSTER_TOKEN
sleep, agent_file = sys.argv[1:4], sys.argv[4]
agent = subprocess.Popen(sleep, env={k: v for k, v in os.environ.items() if k != CLUSTER_TOKEN})
open(agent_file + ".tmp", "w").write(str(agent.pid))
os.rename(agent_file + ".tmp", agent_file)
time.sleep(120)
"""

DRIVER = """
import json, os, subprocess, sys, time
from pathlib import Path
from cluster.reaper import CLUSTER_TOKEN, start_reaper
mode, raylet_source, agent_file, sleep = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
bystander = subprocess.Popen(sleep, env={k: v for k, v in os.environ.items() if k != CLUSTER_TOKEN})
reaper = start_reaper(grace_s=0.5)
raylet = subprocess.Popen([sys.executable, "-c", raylet_source, *sleep, str(agent_file)])
while not agent_file.exists():
    time.sleep(0.05)
print(json.dumps({"reaper": reaper.pid, "raylet": raylet.pid, "agent": int(agent_file.read_text()),
                  "bystander": bystander.pid}), flush=True)
if mode == "close":
    time.sleep(1.5)
    reaper.stdin.close()           # as RayConnection.close(): the reaper sweeps while this process lives on
time.sleep(120)
"""


def alive(pid: int) -> bool:
    """Running, not merely an unreaped zombie."""
    return process_stat(pid) is not None


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture
def driver(tmp_path):
    """Start the stand-in driver in mode "kill" or "close"; yields (process, pids); kills all leftovers after."""
    started: list[tuple[subprocess.Popen, dict]] = []

    def start(mode: str) -> tuple[subprocess.Popen, dict]:
        env = {k: v for k, v in os.environ.items() if k != "KVCOMM_LOCAL_CLUSTER"}
        process = subprocess.Popen([sys.executable, "-c", DRIVER, mode, RAYLET, str(tmp_path / f"agent-{mode}"),
                                    *SLEEP], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        pids = json.loads(process.stdout.readline())
        started.append((process, pids))
        return process, pids

    yield start
    for process, pids in started:
        for pid in [process.pid, *pids.values()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        process.wait()


def test_a_sigkilled_drivers_cluster_is_reaped_even_where_the_token_is_gone(driver) -> None:
    process, pids = driver("kill")
    time.sleep(1.5)                          # the reaper notes the tree at least once while the driver lives
    process.kill()                           # SIGKILL: no cleanup code runs in the driver
    process.wait()
    os.kill(pids["raylet"], signal.SIGKILL)  # Ray's raylet dies with the driver (parent-death signal)
    assert wait_until(lambda: not alive(pids["agent"]), timeout_s=10), "the token-less agent outlived the driver"
    assert wait_until(lambda: not alive(pids["reaper"]), timeout_s=25), "the reaper did not finish"
    assert alive(pids["bystander"]), "the reaper killed a process that was never part of the cluster"


def test_closing_the_pipe_reaps_the_cluster_but_spares_the_living_driver(driver) -> None:
    process, pids = driver("close")
    assert wait_until(lambda: not alive(pids["raylet"]) and not alive(pids["agent"]), timeout_s=10)
    assert wait_until(lambda: not alive(pids["reaper"]), timeout_s=25), "the reaper did not finish"
    assert process.poll() is None and alive(pids["bystander"])
