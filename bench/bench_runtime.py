"""Runtime throughput: every policy's Schedule executed by the runtime on this machine.

Usage: .venv/bin/python bench/bench_runtime.py [TRACE] [--layers N] [--forwards N] [--budget B]
       [--tau T] [--device auto|cuda|cpu] [--refresh sync,async] [--repeats R] [--json FILE]

Prints, per policy (tide policies once per refresh mode), the measured step time, throughput
(generated tokens per second of the executed slice), hit ratio, copies and where the time went,
plus the host-side cost of planning the slots. On a GPU machine this is the measurement behind
"how much faster is TIDE for real"; on a CPU-only machine the GPU side is the CPU (cpu-as-gpu)
and the numbers only describe that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from tidesim_runtime.engine.device import select_device
from tidesim_runtime.engine.executor import Executor, check_memory, first_layers
from tidesim_runtime.engine.slots import plan_slots

from tidesim.bundled.paths import resolve_trace
from tidesim.hardware import get_profile
from tidesim.policies import PolicyOptions, build_schedule, policy_names, uniform
from tidesim.policies.registry import traits
from tidesim.trace.io import read_trace
from tidesim.workload import workload_from_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default="llada2-mini_prefix_g1024")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--forwards", type=int, default=16)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--tau", type=int, default=2)
    parser.add_argument("--hw", default="h100-sxm-pcie5", help="profile the cost-aware policies consult")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--refresh", default="sync,async")
    parser.add_argument("--policies", default=",".join(policy_names(needs_plan=False)))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    workload = workload_from_trace(read_trace(resolve_trace(args.trace)))
    workload = workload.select(np.arange(min(args.forwards, workload.num_forwards)))
    if args.layers < workload.num_layers:
        workload = first_layers(workload, args.layers)
    device = select_device(args.device)
    hw = get_profile(args.hw)
    layers, experts = workload.num_layers, workload.num_experts
    check_memory(workload.model, layers, device, experts, int(workload.tokens.max()), int(workload.context.max()),
                 routing_pairs=int(workload.expert_tokens.sum()))
    print(f"{workload.model.name}: {workload.num_forwards} forwards, {workload.generated_tokens} tokens generated, "
          f"budget {args.budget}, tau {args.tau}; {device.describe()}")
    rows = []
    t0 = time.perf_counter()
    with Executor(workload.model, layers, device, int(workload.tokens.max()), int(workload.context.max())) as ex:
        setup_s = time.perf_counter() - t0
        for name in [p.strip() for p in args.policies.split(",") if p.strip()]:
            for refresh in (args.refresh.split(",") if traits(name).uses_tau else ["sync"]):
                opts = PolicyOptions(budget=uniform(args.budget, layers), tau=uniform(args.tau, layers), hw=hw,
                                     refresh=refresh)
                schedule = build_schedule(name, workload, opts)
                p0 = time.perf_counter()
                plan_slots(schedule)
                plan_ms = (time.perf_counter() - p0) * 1e3
                runs = [ex.replay(workload, schedule) for _ in range(max(args.repeats, 1))]
                m = sorted(runs, key=lambda r: r.total_time_s)[len(runs) // 2]
                label = name + (f" ({refresh})" if traits(name).uses_tau else "")
                rows.append({
                    "policy": label, "step_ms": m.step_time_s * 1e3, "tokens_per_s": m.tokens_per_s,
                    "hit_ratio": m.hit_ratio, "copies": m.expert_copies, "plan_slots_ms": plan_ms,
                    "spread_ms": (statistics.pstdev([r.step_time_s for r in runs]) * 1e3) if len(runs) > 1 else 0.0,
                    **{f"{k}_ms": v * 1e3 for k, v in m.breakdown_s.items()},
                })
    print(f"setup (weights, buffers): {setup_s:.1f} s")
    head = f"{'policy':24s} {'step ms':>9s} {'tok/s':>8s} {'hit':>6s} {'copies':>7s} {'stall ms':>9s} {'cpu wait':>9s}"
    print(head)
    for r in rows:
        print(f"{r['policy']:24s} {r['step_ms']:9.2f} {r['tokens_per_s']:8.1f} {r['hit_ratio']:6.3f} "
              f"{r['copies']:7d} {r['copy_stall_ms'] + r['sync_refresh_ms']:9.1f} {r['cpu_wait_ms']:9.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device.describe(), "trace": args.trace, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
