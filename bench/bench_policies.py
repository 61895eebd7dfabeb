"""How long each offload policy takes to build its Schedule for a bundled trace.

Usage: .venv/bin/python bench/bench_policies.py [TRACE] [--budget B] [--tau T] [--repeats N]
Reports the best of N runs in wall-clock and in process CPU time (the CPU time is the steadier
figure on a shared machine), and checks each schedule with schedule_problems.
"""

from __future__ import annotations

import argparse
import time

from tidesim.policies import build_schedule, policy_names
from tidesim.scenario import resolve
from tidesim.schedule import schedule_problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default="llada2-flash_prefix_g256")
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--tau", type=int, default=2)
    parser.add_argument("--hw", default="h100-sxm-pcie5")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # the inputs resolved as every command resolves them (tidesim.scenario); the schedule is built
    # here, not through tidesim.evaluate, because its building is what this bench times
    scenario = resolve(args.trace, args.hw, policy_names(), budget=args.budget, tau=args.tau)
    workload = scenario.workload
    f, l, e = workload.expert_tokens.shape
    print(f"{args.trace}: {f} forwards x {l} MoE layers x {e} experts, budget {args.budget}, tau {args.tau}")
    print(f"{'policy':16s} {'wall ms':>8s} {'cpu ms':>8s}  valid")
    for name in policy_names():
        wall = cpu = float("inf")
        for _ in range(args.repeats):
            options = scenario.options(name)
            w0, c0 = time.perf_counter(), time.process_time()
            schedule = build_schedule(name, workload, options)
            wall = min(wall, time.perf_counter() - w0)
            cpu = min(cpu, time.process_time() - c0)
        valid = schedule_problems(schedule, workload) == []
        print(f"{name:16s} {wall * 1e3:8.0f} {cpu * 1e3:8.0f}  {valid}")


if __name__ == "__main__":
    main()
