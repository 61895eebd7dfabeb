"""Ctrl-C: every long command exits 130 with one line ("tidesim: interrupted") after what it had
already announced, and leaves nothing half-written. The signal goes to the whole process group, as
a terminal's Ctrl-C does, so worker processes get it too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRID = """\
name: interrupt
description: long enough to be interrupted
parameters:
  trace: {trace}
  hw: h100-sxm-pcie5
  engine: sim
  pcie_gen: [3, 4, 5]
  cpu_cores_scale: [0.5, 1, 2]
  policy: [tide, full-swap, cpu-routing, fiddler]
"""


def _interrupt(argv: list[str], cwd: Path, after: str, timeout_s: float = 60.0) -> tuple[int, list[str]]:
    """Run `tidesim argv`, wait until its stderr shows `after` (its work has started; "": a command
    that announces nothing, given 4 s to start), then Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-m", "tidesim", *argv], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    start = time.monotonic()
    if not after:
        time.sleep(3.0)
    while after and time.monotonic() - start < timeout_s:
        line = proc.stderr.readline()
        lines.append(line.rstrip("\n"))
        if after in line or not line:
            break
    time.sleep(1.0)                      # well inside the work, which takes far longer
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=timeout_s)[1]
    return proc.returncode, [x for x in lines if x] + rest.splitlines()


@pytest.mark.parametrize("command", ["sweep", "demo", "synth"])
def test_ctrl_c_is_exit_130_one_line_nothing_half_written(command: str, tmp_path: Path) -> None:
    if command == "sweep":
        (tmp_path / "grid.yaml").write_text(GRID.format(trace=ROOT / "traces" / "llada2-flash_prefix_g256.parquet"))
        argv, after, out = ["sweep", "grid.yaml", "-o", "results.parquet", "--workers", "2"], "points into", \
            "results.parquet"
    elif command == "demo":
        argv, after, out = ["demo", "-o", "report"], "tidesim demo:", "report"
    else:
        argv, after, out = ["trace", "synth", "--model", "llada2-flash", "--prompts", "40", "--gen-length", "1024",
                            "-o", "syn.parquet"], "", "syn.parquet"
    code, lines = _interrupt(argv, tmp_path, after)
    assert code == 130, lines
    started = [x for x in lines if x.startswith("tidesim ") and after and after in x]
    assert lines[len(started):] == ["tidesim: interrupted"], lines
    assert not (tmp_path / out).exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("grid.yaml",)]
    assert leftovers == [], leftovers
