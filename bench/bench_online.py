"""How long each online policy takes to decide one forward, deciding layer by layer as the live
engine does (tidesim generate): one step call per MoE layer with that layer's routing.

Usage: .venv/bin/python bench/bench_online.py [TRACE] [--budget B] [--tau T] [--forwards N]
Goal (issue #12): at most 1 ms per forward for mini shapes (19 MoE layers x 256 experts) on one
core. The process is pinned to one core where the OS allows it (os.sched_setaffinity) and numpy's
threads to one. Reports the median and 99th percentile per forward, in wall-clock and in process
CPU time (the steadier figure on a shared machine).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from tidesim.bundled.paths import resolve_trace  # noqa: E402
from tidesim.hardware import get_profile  # noqa: E402
from tidesim.policies import PolicyOptions, build_schedule, uniform  # noqa: E402
from tidesim.policies.base import online_names, online_policy  # noqa: E402
from tidesim.policies.step import forward_metas  # noqa: E402
from tidesim.trace.io import read_trace  # noqa: E402
from tidesim.workload import workload_from_trace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default="llada2-mini_prefix_g256")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--tau", type=int, default=2)
    parser.add_argument("--hw", default="h100-sxm-pcie5")
    parser.add_argument("--forwards", type=int, default=200, help="forwards timed per policy (200)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    workload = workload_from_trace(read_trace(resolve_trace(args.trace)))
    n = min(args.forwards, workload.num_forwards)
    workload = workload.select(np.arange(n))
    hw = get_profile(args.hw)
    f, l, e = workload.expert_tokens.shape
    print(f"{args.trace}: {f} forwards x {l} MoE layers x {e} experts, budget {args.budget}, tau {args.tau}; "
          "one step call per layer")
    print(f"{'policy':16s} {'median us':>10s} {'p99 us':>8s} {'cpu median us':>14s}  goal 1000 us")
    metas = forward_metas(workload)
    for name in online_names():
        options = PolicyOptions(budget=uniform(args.budget, l), tau=uniform(args.tau, l), hw=hw)
        if name in ("cpu-routing", "fiddler"):
            # online the static set is given up front: here the popular set of the trace's warm-up
            options.static_resident = build_schedule(name, workload, options).initial_resident
        policy = online_policy(name, workload.model, options, layers=l)
        wall, cpu = np.zeros(n), np.zeros(n)
        layers = [np.array([i]) for i in range(l)]
        for meta in metas:
            counts = workload.expert_tokens[meta.index]
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(l):
                policy.step(meta, counts[i:i + 1], layers[i])
            wall[meta.index] = time.perf_counter() - w0
            cpu[meta.index] = time.process_time() - c0
        med, p99 = np.median(wall) * 1e6, np.percentile(wall, 99) * 1e6
        print(f"{name:16s} {med:10.0f} {p99:8.0f} {np.median(cpu) * 1e6:14.0f}  "
              f"{'ok' if med <= 1000 else 'MISSED'}")


if __name__ == "__main__":
    main()
