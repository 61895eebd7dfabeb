"""Capture speed: `tidesim trace capture` of mini shapes (4 layers), as a user runs it.

Usage: .venv/bin/python bench/bench_capture.py [--layers 4] [--gen-length 256] [--kv-cache prefix]
       [--threads 1] [--output FILE] [--compare TRACE] [--json FILE]

Runs the command in a child process (random weights from seed 0, one random 32-token prompt,
block 32, threshold 0.95, float32) and prints its wall time, CPU time (user + system of the
child), peak resident memory, the load and decode seconds the command reports, and the number of
forwards. `--compare TRACE` also says whether the new trace's forwards and per-forward expert
counts equal those of TRACE (e.g. the bundled one), i.e. whether a rule change moved the routing.
The machine is shared: report CPU time next to wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tidesim.trace.io import read_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--kv-cache", choices=["none", "prefix"], default="prefix")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the child (default 1)")
    parser.add_argument("--output", help="keep the trace here (default: a temporary file)")
    parser.add_argument("--compare", help="trace whose forwards and expert counts the new one should equal")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    out = Path(args.output) if args.output else Path(tempfile.mkdtemp()) / "capture.parquet"
    command = [sys.executable, "-m", "tidesim", "trace", "capture", "--config", "llada2-mini", "--layers",
               str(args.layers), "--prompt-tokens", "32", "--num-prompts", "1", "--gen-length", str(args.gen_length),
               "--block-length", "32", "--threshold", "0.95", "--kv-cache", args.kv_cache, "--seed", "0",
               "--dtype", "float32", "-o", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"capture failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    report = json.loads(proc.stdout)
    trace = read_trace(out)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    figures = {
        "command": " ".join(["tidesim", *command[3:]]), "threads": args.threads,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "peak_rss_gb": round(after.ru_maxrss / 2**20, 2), "load_s": report["load_seconds"],
        "decode_s": report["decode_seconds"], "forwards": trace.num_forwards,
        "steps": int((trace.forwards["phase"] == "step").sum()),
        "steps_per_block": trace.meta.prompts[0].get("steps_per_block"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.compare:
        ref = read_trace(args.compare)
        cols = ["prompt", "block", "step", "phase", "tokens", "context", "committed"]
        figures["same_routing_as"] = args.compare
        figures["same_routing"] = bool(ref.forwards[cols].equals(trace.forwards[cols])
                                       and np.array_equal(ref.expert_tokens, trace.expert_tokens))
    for k, v in figures.items():
        print(f"{k:16s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
