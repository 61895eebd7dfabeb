"""How long `tidesim trace synth` and `tidesim trace stats` take (speed goal: synthesis of
llada2-mini, 10 prompts, no KV cache, gen length 1024 with early stop, in at most 10 s on a 2-core
machine).

Usage: .venv/bin/python bench/bench_synth.py [--repeats N]
Times the whole command (a fresh `tidesim` process: start-up, generation, validation, Parquet
write) and, in-process, generation alone; also `trace stats` on the bundled no-cache mini trace.
Reports the best of N in wall-clock and the CPU time (the child's for commands, the process's for
generation; steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tidesim.models import get_model
from tidesim.trace.synth import SynthConfig, synthesize

TIDESIM = [sys.executable, "-m", "tidesim"]


def run_timed(argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the child) for one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def best(fn, repeats: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "mini.parquet")
        synth = [*TIDESIM, "trace", "synth", "--model", "llada2-mini", "--prompts", "10", "--gen-length", "1024",
                 "--kv-cache", "none", "--eos", "early-stop", "--seed", "1", "-o", out]
        wall, cpu = best(lambda: run_timed(synth), args.repeats)
        results["synth mini none 10 prompts g1024 early stop (command)"] = {"wall_s": wall, "cpu_s": cpu}

        def gen_only() -> tuple[float, float]:
            cfg = SynthConfig(model=get_model("llada2-mini"), prompts=10, gen_length=1024, kv_cache="none",
                              eos="early-stop", seed=1)
            w0, c0 = time.perf_counter(), time.process_time()
            synthesize(cfg)
            return time.perf_counter() - w0, time.process_time() - c0
        wall, cpu = best(gen_only, args.repeats)
        results["synth mini none 10 prompts g1024 early stop (generation only)"] = {"wall_s": wall, "cpu_s": cpu}
        stats = [*TIDESIM, "trace", "stats", "llada2-mini_none_g1024", "--json"]
        wall, cpu = best(lambda: run_timed(stats), args.repeats)
        results["stats llada2-mini_none_g1024 (command)"] = {"wall_s": wall, "cpu_s": cpu}
    results["machine"] = {"cpus": float(os.cpu_count() or 0), "load_1min": os.getloadavg()[0]}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
