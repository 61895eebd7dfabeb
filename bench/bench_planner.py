"""Planner benchmark: cost-table and MILP solve times, and whether the plan beats every single tau.

Usage: .venv/bin/python bench/bench_planner.py [TRACE] [--hw H] [--gpu-mem-gib G] [--calibrate 0,1]
       [--engine sim|analytic] [--repeats N] [--policy P] [--taus LIST] [--budget-factors LIST]

Defaults: the bundled llada2-flash prefix-cache trace on the H100 preset with the GPU memory the
public TIDE code would use (the 80 GB card: budget_for_memory gives 84 experts per layer, below the
flash scripts' cap of 96). Checks (exit status 1 when one fails):
- the per-layer MILP is solved to proven optimality in at most 10 s (best of N solves);
- with the chosen executor (default: the simulator), the plan `tidesim plan` would write (the
  fastest of the knapsack optimum, the per-layer intervals and every single tau on the evaluation
  prompts, tidesim.planner.select_plan) run as `planned` is at least as fast as the best single-tau
  policy (`--taus`, default 1..32, uniform budget for the same memory, picked in hindsight) on the evaluation
  prompts: the held-out ones, or the calibration ones when none are held out. The other set's
  comparison is printed, not checked (the plan is chosen where it is evaluated).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from tidesim.planner import (
    compare_on,
    cost_table,
    fit_candidates,
    oracle_bound,
    oracle_costs,
    parse_int_list,
    plan_policies,
    select_plan,
    solve_plan,
    uniform_budget,
)
from tidesim.scenario import profile_of, resolve_budget, resolve_plan

SOLVE_LIMIT_S = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default="llada2-flash_prefix_g256")
    parser.add_argument("--hw", default="h100-sxm-pcie5")
    parser.add_argument("--gpu-mem-gib", type=float, default=None, help="default: the profile's GPU memory")
    parser.add_argument("--calibrate", default=None, help="calibration prompt ids (default: first half)")
    parser.add_argument("--engine", default="sim", choices=["sim", "analytic"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policy", default="tide", choices=plan_policies(), help="policy to plan for (default tide)")
    parser.add_argument("--taus", default="1..32", help="candidate intervals (default 1..32)")
    parser.add_argument("--budget-factors", default=None,
                        help="candidate budgets as factors of the uniform budget, e.g. 0.5,1,1.5 (default: the "
                             "planner's grid)")
    args = parser.parse_args()

    hw = profile_of(args.hw)
    gib = args.gpu_mem_gib if args.gpu_mem_gib is not None else hw.gpu.memory_gib
    calibrate = parse_int_list(args.calibrate, "--calibrate", allow_zero=True) if args.calibrate else None
    taus = parse_int_list(args.taus, "--taus", allow_zero=True)
    inputs = resolve_plan(args.trace, hw, gib, args.policy, calibrate_prompts=calibrate, taus=taus)
    workload, calib, held, slots = inputs.workload, inputs.calibration, inputs.heldout, inputs.slots
    model = workload.model
    cw = workload.select_prompts(calib)
    layers, experts = model.num_moe_layers, model.num_experts
    u = uniform_budget(slots, layers, experts)
    tide_budget = resolve_budget(None, gib, workload, hw)[0]
    if args.budget_factors:
        factors = [float(f) for f in args.budget_factors.split(",")]
        budgets = sorted({min(max(round(u * f), 1), experts) for f in factors} | {u})
    else:
        budgets = sorted(set(inputs.budgets) | {u})
    print(f"{args.trace} on {hw.name}, {gib:g} GiB: {slots} expert slots, uniform budget {u} "
          f"(the public code's budget here: {tide_budget}); calibration prompts {calib}, held out {held}; "
          f"planning for {args.policy}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")

    t0 = time.perf_counter()
    table = cost_table(cw, hw, taus, budgets, policy=args.policy)
    table_s = time.perf_counter() - t0
    print(f"cost table ({args.policy}): {len(taus)} taus x {len(budgets)} budgets x {layers} layers in {table_s:.1f} s")

    ok = True
    results = {}
    for mode, global_tau in (("per-layer", False), ("global-tau", True)):
        best = float("inf")
        for _ in range(args.repeats):
            res = solve_plan(table, slots, global_tau=global_tau)
            best = min(best, res.wall_time_s)
        results[mode] = res
        print(f"MILP {mode}: {res.status}, best of {args.repeats} solves {best:.2f} s, "
              f"predicted {res.objective_s:.3f} s")
        if mode == "per-layer" and not (res.proven_optimal and best <= SOLVE_LIMIT_S):
            print(f"FAIL: per-layer plan not proven optimal within {SOLVE_LIMIT_S} s")
            ok = False
    result, candidates = fit_candidates(table, slots, u, False, None)
    chosen_on = held or calib
    plan, selection, _ = select_plan(workload.select_prompts(chosen_on), hw, chosen_on, candidates, u, args.engine,
                                     args.policy)
    print(f"kept {selection.chosen} of {len(candidates)} candidates on prompts {chosen_on} ({args.engine}); "
          f"knapsack optimum {result.objective_s:.3f} s on the calibration prompts")
    t0 = time.perf_counter()
    bound = oracle_bound(oracle_costs(cw, hw), plan.budget, layer_upper_s=None)
    print(f"oracle bound {bound.bound_s:.3f} s ({bound.iterations} iterations, {time.perf_counter() - t0:.1f} s); "
          f"gap {table.total_s(plan.tau, plan.budget) / bound.bound_s - 1:.1%}")
    print(f"plan tau   : {plan.tau.tolist()}")
    print(f"plan budget: {plan.budget.tolist()} (sum {int(plan.budget.sum())} of {slots})")

    for name, prompts in (("calibration", calib), ("held-out", held)):
        if not prompts:
            continue
        t0 = time.perf_counter()
        ev = compare_on(workload.select_prompts(prompts), hw, prompts, plan.tau, plan.budget, taus, u, args.engine,
                        args.policy)
        verdict = "ok" if ev.plan_tokens_per_s >= ev.best_single_tau_tokens_per_s * (1 - 1e-9) else "FAIL"
        if prompts != chosen_on:
            verdict = "(not checked: the plan is chosen on the other set)"
        ok &= verdict != "FAIL"
        print(f"{name} ({args.engine}, {time.perf_counter() - t0:.0f} s): planned {ev.plan_tokens_per_s:.3f} tok/s, "
              f"best single tau {ev.best_single_tau} (B {u}) {ev.best_single_tau_tokens_per_s:.3f} tok/s, "
              f"speedup {ev.speedup:.4f}x  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
