"""Simulator and analytic-model speed on the issue's benchmark case, and engine agreement.

Speed (default): llada2-flash, prefix KV cache, one prompt of 256 generated tokens, policy tide,
preset h100-sxm-pcie5 (analytic_async_engine_s: the analytic model on the same case with
asynchronous refresh, which adds its background-copy queue). Goals: the simulator within 2 s;
the analytic model at least 100x faster.
Both engines start from the same per-expert costs (tidesim.sim.costs.schedule_costs, shared), so
the table reports that step, each engine alone, and end to end (the workload's cell times are
kept per workload object, so repeated runs reuse them; analytic_first_costing_s is a run on a
fresh workload object, which evaluates them). The policy's builder records the schedule's sparse
cells (copies, CPU runs, demotions; Schedule.sparse) when it builds it, so costing does not scan
the dense [F, L, E] arrays; analytic_scanned_s is a run on the same arrays without that record
(a schedule loaded from a file or made by hand), which scans them.

Agreement (--agreement): simulator vs analytic total time for every policy on every bundled trace
(all prompts) with the H100 and A100 presets; the table docs/costmodel.md quotes.

    .venv/bin/python bench/bench_sim.py [--repeats 5] [--json out.json]
    .venv/bin/python bench/bench_sim.py --agreement [--traces A,B] [--presets P,Q] [--policies tide-async]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from tidesim.bundled.paths import bundled_traces
from tidesim.costmodel import estimate, lower_bound
from tidesim.hardware import HardwareProfile
from tidesim.policies import build_schedule, policy_names
from tidesim.policies.registry import reference_policy
from tidesim.run import run
from tidesim.scenario import assemble, profile_of, read_inputs
from tidesim.schedule import Schedule
from tidesim.sim.costs import ScheduleCosts, schedule_costs
from tidesim.sim.engine import simulate
from tidesim.workload import Workload


def load(trace: str, prompts: list[int] | None) -> Workload:
    """The trace's workload, looked up and read as every command does (scenario.read_inputs)."""
    w = read_inputs(trace)[2]
    return w.select_prompts(prompts) if prompts else w


def make_schedule(w: Workload, hw: HardwareProfile, policy: str, refresh: str = "sync", tau: int = 2) -> Schedule:
    """The policy's schedule on the scenario assembled for it: the default budget rule on the
    profile's GPU memory and tau checked as every command's (the timed steps start from it)."""
    scenario = assemble("bench", w, hw, [policy], tau=tau, refresh=refresh)
    return build_schedule(policy, scenario.workload, scenario.options(policy))


def median_time(fn: Any, repeats: int) -> dict[str, float]:
    """Median wall-clock and process-CPU seconds (CPU time is the steadier figure on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def uncached(costs: ScheduleCosts) -> ScheduleCosts:
    """The costs as the costing left them: each engine computes the CPU pool's makespans on first
    use and keeps them (ScheduleCosts.cpu_span), so a timed engine run starts without them."""
    r = costs.rates
    if max(r.contention, r.pool_contention, r.slows, r.slows_cpu) <= 0:      # else the costing needed them
        costs.cpu.span = None
    return costs


def speed(repeats: int) -> dict[str, Any]:
    # sub-millisecond steps get many more samples: 20 samples of 0.6 ms span ~12 ms, shorter than
    # a busy neighbour's burst on a shared machine, which then moves the median
    fast = max(repeats, 200)
    w = load("llada2-flash_prefix_g256", [0])
    hw = profile_of("h100-sxm-pcie5")
    sched = make_schedule(w, hw, "tide")
    costs = schedule_costs(w, sched, hw)
    async_costs = schedule_costs(w, make_schedule(w, hw, "tide", "async"), hw)
    out: dict[str, Any] = {
        "case": "llada2-flash_prefix_g256 prompt 0, tide (tau 2, sync), h100-sxm-pcie5",
        "forwards": w.num_forwards, "layers": w.num_layers, "generated_tokens": w.generated_tokens,
        "costs_s": median_time(lambda: schedule_costs(w, sched, hw), fast),
        "sim_engine_s": median_time(lambda: simulate(uncached(costs)), repeats),
        "analytic_engine_s": median_time(lambda: (estimate(uncached(costs)), lower_bound(costs)), fast),
        # the same case with asynchronous refresh: the analytic model's background-copy queue too
        "analytic_async_engine_s": median_time(lambda: (estimate(uncached(async_costs)), lower_bound(async_costs)),
                                               fast),
        "sim_end_to_end_s": median_time(lambda: run(w, sched, hw, engine="sim", check=False), repeats),
        "analytic_end_to_end_s": median_time(lambda: run(w, sched, hw, engine="analytic", check=False), fast),
        # the first costing of a workload object also evaluates its cell times (kept for later schedules)
        "analytic_first_costing_s": median_time(
            lambda: run(dataclasses.replace(w), sched, hw, engine="analytic", check=False), repeats),
        # the same schedule without the builder's sparse record: costing scans its arrays
        "analytic_scanned_s": median_time(
            lambda: run(w, dataclasses.replace(sched, cells=None), hw, engine="analytic", check=False), fast),
    }
    for clock in ("wall", "cpu"):
        out[f"engine_ratio_{clock}"] = out["sim_engine_s"][clock] / out["analytic_engine_s"][clock]
        out[f"end_to_end_ratio_{clock}"] = out["sim_end_to_end_s"][clock] / out["analytic_end_to_end_s"][clock]
    out["sim_within_2s"] = out["sim_end_to_end_s"]["wall"] <= 2.0
    return out


def agreement(traces: list[str] | None = None, presets: list[str] | None = None,
              columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of the agreement table; `columns`: only these (policy names, tide-async for tide with
    asynchronous refresh)."""
    rows = []
    for trace in traces or bundled_traces():
        w = load(trace, None)
        for hw_name in presets or ["h100-sxm-pcie5", "a100-80gb-pcie4"]:
            hw = profile_of(hw_name)
            for policy in policy_names():
                for refresh in (("sync", "async") if policy == reference_policy() else ("sync",)):
                    if columns is not None and policy + ("-async" if refresh == "async" else "") not in columns:
                        continue
                    try:
                        sched = make_schedule(w, hw, policy, refresh)
                    except Exception as exc:  # noqa: BLE001  (a policy may refuse a budget; record it)
                        rows.append({"trace": trace, "hw": hw_name, "policy": policy, "error": str(exc)})
                        continue
                    t0 = time.perf_counter()
                    sim = run(w, sched, hw, check=False)
                    t_sim = time.perf_counter() - t0
                    ana = run(w, sched, hw, engine="analytic", check=False)
                    rows.append({
                        "trace": trace, "hw": hw_name, "policy": policy + ("-async" if refresh == "async" else ""),
                        "sim_tok_s": sim.tokens_per_s, "analytic_tok_s": ana.tokens_per_s,
                        "diff_pct": 100.0 * (ana.total_time_s / sim.total_time_s - 1.0),
                        "sim_over_bound_pct": 100.0 * (sim.total_time_s / sim.lower_bound_s - 1.0),
                        "sim_s": t_sim,
                    })
                    print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['trace']:26s} {r['hw']:16s} {r['policy']:16s} error: {r['error']}"
    return (f"{r['trace']:26s} {r['hw']:16s} {r['policy']:16s} sim {r['sim_tok_s']:9.2f} tok/s  "
            f"analytic {r['analytic_tok_s']:9.2f}  diff {r['diff_pct']:+6.2f}%  "
            f"sim/bound {r['sim_over_bound_pct']:+6.2f}%  ({r['sim_s']:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--agreement", action="store_true", help="engine agreement over bundled traces and presets")
    ap.add_argument("--traces", help="with --agreement: comma-separated bundled traces (default: all)")
    ap.add_argument("--presets", help="with --agreement: comma-separated presets (default: h100-sxm-pcie5,"
                                      "a100-80gb-pcie4)")
    ap.add_argument("--policies", help="with --agreement: comma-separated columns (policy names, tide-async; "
                                       "default: all)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    columns = args.policies.split(",") if args.policies else None
    known = [*policy_names(), "tide-async"]
    if columns is not None and any(c not in known for c in columns):
        ap.error(f"--policies: unknown column in {args.policies!r}; choose from {', '.join(known)}")
    meta = {"machine": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
            "date": time.strftime("%Y-%m-%d")}
    if args.agreement:
        result: Any = {"meta": meta, "rows": agreement(args.traces.split(",") if args.traces else None,
                                                       args.presets.split(",") if args.presets else None,
                                                       columns)}
    else:
        result = {"meta": meta, **speed(args.repeats)}
        for key, value in result.items():
            if isinstance(value, dict) and "wall" in value:
                value = f"wall {value['wall'] * 1e3:9.2f} ms   cpu {value['cpu'] * 1e3:9.2f} ms"
            print(f"{key:24s} {value:.1f}" if isinstance(value, float) else f"{key:24s} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
