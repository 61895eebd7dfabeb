"""tide-split against tide (sync and async refresh) and the oracle on the bundled traces.

Issue 23's measurement: per case (trace x preset), the calibration prompts (the first half, as
`tidesim plan` and `tidesim demo` split them) pick each variant's refresh interval (the analytic
best of the default-tau candidates), and the held-out prompts are predicted with the analytic
model and the simulator. Budget: the preset's GPU memory sized as the TIDE scripts do (capped at
128 experts per layer for mini, 96 for flash; `tidesim compare`'s default). The table gives
tokens/s (analytic) of tide sync, tide async, tide-split sync and async, the oracle (a bound),
tide-split's best over tide's best, the share of the tide-to-oracle gap it closes, and how far
the simulator is from the analytic figure for the tide-split variant shown.

  Usage: .venv/bin/python bench/bench_tide_split.py [--cases mini-none-h100,...] [--json out.json]
  The 8 cases take about 15 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

from tidesim.default_tau import CANDIDATE_TAUS, fastest_tau, tide_tokens_per_s
from tidesim.hardware import HardwareProfile
from tidesim.planner import split_prompts
from tidesim.policies import build_schedule
from tidesim.run import run
from tidesim.scenario import assemble, resolve
from tidesim.workload import Workload

TRACES = {"mini-none": "llada2-mini_none_g1024", "flash-none": "llada2-flash_none_g256",
          "mini-prefix": "llada2-mini_prefix_g1024", "flash-prefix": "llada2-flash_prefix_g256"}
PRESETS = {"h100": "h100-sxm-pcie5", "a100": "a100-80gb-pcie4"}
CASES = [f"{t}-{p}" for t in TRACES for p in PRESETS]
VARIANTS = [("tide", "sync"), ("tide", "async"), ("tide-split", "sync"), ("tide-split", "async")]


@dataclass
class Case:
    case: str
    budget: int
    calibration: list[int]
    held_out: list[int]
    tau: dict[str, int]              # "policy refresh" -> tau picked on the calibration prompts
    analytic: dict[str, float]       # tokens/s on the held-out prompts
    sim: dict[str, float]
    speedup: float                   # tide-split (better mode) over tide (better mode), analytic
    gap_closed: float                # of tide's gap to the oracle
    sim_vs_analytic: float           # tide-split's better mode: simulator / analytic - 1
    seconds: float


def best_tau(w: Workload, hw: HardwareProfile, budget: int, policy: str, refresh: str) -> int:
    """The analytic best tau of CANDIDATE_TAUS (the default-tau rule's search and tie rule, for
    this policy: default_tau.tide_tokens_per_s, fastest_tau)."""
    return fastest_tau(tide_tokens_per_s(w, hw, budget, refresh, CANDIDATE_TAUS, policy))


def measure(case: str) -> Case:
    start = time.perf_counter()
    trace_key, preset = case.rsplit("-", 1)
    policies = [p for p, _ in VARIANTS] + ["oracle"]
    base = resolve(TRACES[trace_key], PRESETS[preset], policies, tau=1)   # budget: the default rule; tau per variant
    workload, hw, budget = base.workload, base.hw, base.budget
    calib, held = split_prompts(sorted({int(p) for p in workload.prompt}), None)
    w_cal, w_held = workload.select_prompts(calib), workload.select_prompts(held)
    taus, analytic, sim = {}, {}, {}
    for policy, refresh in VARIANTS:
        key = f"{policy} {refresh}"
        taus[key] = tau = best_tau(w_cal, hw, budget, policy, refresh)
        scenario = assemble(base.trace, w_held, hw, [policy], budget=budget, tau=tau, refresh=refresh)
        schedule = build_schedule(policy, w_held, scenario.options(policy))
        analytic[key] = run(w_held, schedule, hw, engine="analytic").tokens_per_s
        if policy == "tide-split":
            sim[key] = run(w_held, schedule, hw, engine="sim").tokens_per_s
    bound = assemble(base.trace, w_held, hw, ["oracle"], budget=budget, tau=1)
    oracle = build_schedule("oracle", w_held, bound.options("oracle"))
    analytic["oracle"] = run(w_held, oracle, hw, engine="analytic").tokens_per_s
    tide = max(analytic["tide sync"], analytic["tide async"])
    mine_key = max(("tide-split sync", "tide-split async"), key=lambda k: analytic[k])
    mine = analytic[mine_key]
    gap = analytic["oracle"] - tide
    return Case(case=case, budget=budget, calibration=calib, held_out=held, tau=taus, analytic=analytic, sim=sim,
                speedup=mine / tide, gap_closed=(mine - tide) / gap if gap > 0 else math.nan,
                sim_vs_analytic=sim[mine_key] / mine - 1, seconds=time.perf_counter() - start)


def table(cases: list[Case]) -> list[str]:
    head = ("| case | budget | tide sync | tide async | tide-split sync | tide-split async | oracle (bound) | "
            "tide-split / best tide | gap to oracle closed | sim vs analytic |")
    out = [head, "|" + "---|" * 2 + "---:|" * 8]
    for c in cases:
        cells = " | ".join(f"{c.analytic[k]:.2f} (tau {c.tau[k]})" for k in (f"{p} {r}" for p, r in VARIANTS))
        out.append(f"| {c.case} | {c.budget} | {cells} | {c.analytic['oracle']:.2f} | {c.speedup:.3f}x "
                   f"| {100 * c.gap_closed:.0f}% | {100 * c.sim_vs_analytic:+.2f}% |")
    geo = math.exp(sum(math.log(c.speedup) for c in cases) / len(cases)) if cases else math.nan
    none = [c.gap_closed for c in cases if "-none-" in c.case]
    out.append("")
    out.append(f"geometric mean of tide-split / best tide over {len(cases)} cases: {geo:.3f}x (goal 1.2x); "
               f"gap closed in the no-cache cases: {', '.join(f'{100 * g:.0f}%' for g in none)} (goal 50%)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"unknown case {unknown[0]!r}; use some of {', '.join(CASES)}", file=sys.stderr)
        return 2
    cases = []
    for name in names:
        cases.append(measure(name))
        print(f"{name}: {cases[-1].seconds:.0f} s", file=sys.stderr, flush=True)
    print("\n".join(table(cases)))
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as fh:
            json.dump([asdict(c) for c in cases], fh, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
