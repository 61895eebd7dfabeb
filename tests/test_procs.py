"""Worker processes end with their parent, even after kill -9 (the local sweep executor's pool)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The parent: a LocalExecutor with two busy workers; prints their pids, then waits to be killed.
PARENT = """
import sys, time
import tidesim.procs
if sys.argv[1] == "watchdog-only":
    tidesim.procs.PR_SET_PDEATHSIG = 0        # prctl(0) is refused: only the watchdog thread acts
from tidesim.sweep.executors import LocalExecutor

def busy(_):
    time.sleep(120)

ex = LocalExecutor(2)
futures = [ex.pool.submit(busy, i) for i in range(2)]
time.sleep(1.0)
print(" ".join(str(p.pid) for p in ex.pool._processes.values()), flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state          # a zombie has exited (nobody reaped it yet)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog-only"])
def test_workers_die_with_a_killed_parent(mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(p) for p in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in workers), f"workers {workers} outlived their parent ({mode})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
