"""How long each offload policy takes to build its Schedule for a bundled trace.

Usage: .venv/bin/python bench/bench_policies.py [TRACE] [--budget B] [--tau T] [--repeats N]
Reports the best of N runs in wall-clock and in process CPU time (the CPU time is the steadier
figure on a shared machine), and checks each schedule with schedule_problems.
"""

from __future__ import annotations

import argparse
import time

from tidesim.bundled.paths import resolve_trace
from tidesim.hardware import get_profile
from tidesim.policies import PolicyOptions, build_schedule, policy_names, uniform
from tidesim.schedule import schedule_problems
from tidesim.trace.io import read_trace
from tidesim.workload import workload_from_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default="llada2-flash_prefix_g256")
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--tau", type=int, default=2)
    parser.add_argument("--hw", default="h100-sxm-pcie5")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workload = workload_from_trace(read_trace(resolve_trace(args.trace)))
    hw = get_profile(args.hw)
    f, l, e = workload.expert_tokens.shape
    print(f"{args.trace}: {f} forwards x {l} MoE layers x {e} experts, budget {args.budget}, tau {args.tau}")
    print(f"{'policy':16s} {'wall ms':>8s} {'cpu ms':>8s}  valid")
    for name in policy_names():
        wall = cpu = float("inf")
        for _ in range(args.repeats):
            options = PolicyOptions(budget=uniform(args.budget, l), tau=uniform(args.tau, l), hw=hw)
            w0, c0 = time.perf_counter(), time.process_time()
            schedule = build_schedule(name, workload, options)
            wall = min(wall, time.perf_counter() - w0)
            cpu = min(cpu, time.process_time() - c0)
        valid = schedule_problems(schedule, workload) == []
        print(f"{name:16s} {wall * 1e3:8.0f} {cpu * 1e3:8.0f}  {valid}")


if __name__ == "__main__":
    main()
