"""The 200-point sweep benchmark: `tidesim sweep docs/examples/bench-200.yaml` on local cores.

Usage: .venv/bin/python bench/bench_sweep.py [--grid FILE] [--workers N] [--dask] [--kill-after K]

Runs the command as a user would (a fresh process, figures included) and reports wall-clock and
CPU time (CPU of the command and its worker processes; the steadier figure on a shared machine).
--dask: run the same grid again through a local Dask cluster (`--executor dask`) and check that
the results file is byte-for-byte the local one. --kill-after K: kill a third run once K points
have finished, restart it, and check that the restart evaluates only the missing points and
gives the same bytes. Goal (issue 15, was 120 s in issue 6): 200 points on 2 cores in at most
20 s of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 20.0


def sweep(grid: Path, out: Path, *extra: str) -> tuple[float, float, dict[str, object]]:
    """Run `tidesim sweep`; return wall seconds, CPU seconds (with children) and its --json report."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tidesim", "sweep", str(grid), "-o", str(out), "--json", *extra],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"tidesim sweep failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(proc.stdout)


def kill_and_resume(grid: Path, out: Path, workers: int, after: int) -> dict[str, object]:
    parts = out.with_name(out.stem + ".parts")
    cmd = [sys.executable, "-m", "tidesim", "sweep", str(grid), "-o", str(out), "--workers", str(workers),
           "--no-figures"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while len(list(parts.glob("*.json"))) < after and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(parts.glob("*.json")))
    _, _, report = sweep(grid, out, "--workers", str(workers), "--no-figures")
    return {"finished_before_kill": finished, "evaluated_on_restart": report["evaluated"],
            "reused_on_restart": report["reused"], "points": report["points"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "examples" / "bench-200.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dask", action="store_true", help="also run through a local Dask cluster and compare")
    parser.add_argument("--kill-after", type=int, default=0, metavar="K",
                        help="also kill a run after K finished points and restart it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "local.parquet"
        wall, cpu, report = sweep(args.grid, local, "--workers", str(args.workers))
        points = report["points"]
        verdict = "meets" if wall <= GOAL_S else "MISSES"
        print(f"{args.grid.name}: {points} points, {args.workers} workers, {report['errors']} error rows, "
              f"{len(report['figures'])} figures")  # type: ignore[arg-type]
        print(f"local: wall {wall:.1f} s, CPU {cpu:.1f} s ({verdict} the {GOAL_S:.0f} s goal)")
        if args.dask:
            dask_out = Path(tmp) / "dask.parquet"
            dwall, dcpu, _ = sweep(args.grid, dask_out, "--executor", "dask", "--workers", str(args.workers),
                                   "--no-figures")
            same = dask_out.read_bytes() == local.read_bytes()
            print(f"dask (local cluster): wall {dwall:.1f} s, CPU {dcpu:.1f} s; results identical: {same}")
        if args.kill_after:
            resumed = Path(tmp) / "killed.parquet"
            info = kill_and_resume(args.grid, resumed, args.workers, args.kill_after)
            same = resumed.read_bytes() == local.read_bytes()
            print(f"killed after {info['finished_before_kill']} finished points; the restart evaluated "
                  f"{info['evaluated_on_restart']} and reused {info['reused_on_restart']} of {info['points']}; "
                  f"results identical: {same}")


if __name__ == "__main__":
    main()
