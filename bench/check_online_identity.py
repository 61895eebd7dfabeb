"""tide-split decided layer by layer (the live engine's way: compiled one-layer calls) against the
offline builder (the batched numpy path, which the goldens and every figure come from).

The two paths must make the same decisions bit for bit: placement, copies, demotions and the
resident set of every (forward, layer). tests/test_policies_tide_split.py checks this on random
workloads and on a prefix of the bundled mini traces; this script checks the whole bundled
traces (mini and flash, prefix cache and none), sync and async refresh, tau 2 and 8, H100 and
A100 presets, each trace at `tidesim compare`'s default budget for the preset. Exit status 1 on
any difference, with the first differing cell.

  Usage: .venv/bin/python bench/check_online_identity.py [--traces a,b] [--presets h100,a100]
         [--taus 2,8] [--refresh sync,async]
  All 32 cases take several minutes on 2 loaded cores (the offline builder dominates).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.policies.driver import online_policy
from tidesim.policies.step import layered_schedule
from tidesim.scenario import resolve
from tidesim.schedule import Schedule

TRACES = {"mini-prefix": "llada2-mini_prefix_g1024", "mini-none": "llada2-mini_none_g1024",
          "flash-prefix": "llada2-flash_prefix_g256", "flash-none": "llada2-flash_none_g256"}
PRESETS = {"h100": "h100-sxm-pcie5", "a100": "a100-80gb-pcie4"}
FIELDS = ("placement", "copy", "demote", "resident")


def first_difference(offline: Schedule, live: Schedule) -> str | None:
    for f in FIELDS:
        a, b = getattr(offline, f), getattr(live, f)
        if not np.array_equal(a, b):
            at = tuple(int(i) for i in np.argwhere(a != b)[0])
            return f"{f} differs at (forward, layer, expert) {at}: offline {a[at]}, live {b[at]}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--taus", default="2,8")
    ap.add_argument("--refresh", default="sync,async")
    args = ap.parse_args(argv)
    bad = 0
    for trace in args.traces.split(","):
        for preset in args.presets.split(","):
            if trace not in TRACES or preset not in PRESETS:
                print(f"error: unknown trace or preset {trace!r}/{preset!r}", file=sys.stderr)
                return 2
            base = resolve(TRACES[trace], PRESETS[preset], ["tide-split"], tau=1)
            w, hw, budget = base.workload, base.hw, base.budget
            for tau in (int(t) for t in args.taus.split(",")):
                for refresh in args.refresh.split(","):
                    start = time.perf_counter()
                    opts = PolicyOptions(budget=uniform(budget, w.num_layers), tau=uniform(tau, w.num_layers),
                                         hw=hw, refresh=refresh)
                    offline = build_schedule("tide-split", w, opts)
                    live = layered_schedule(online_policy("tide-split", w.model, opts, layers=w.num_layers), w)
                    diff = first_difference(offline, live)
                    n_od = int((offline.copy == 1).sum())
                    print(f"{trace} {preset} budget {budget} tau {tau} {refresh}: "
                          f"{'identical' if diff is None else 'DIFFERENT: ' + diff} "
                          f"({w.num_forwards} forwards, {n_od} on-demand copies, "
                          f"{time.perf_counter() - start:.1f} s)", flush=True)
                    bad += diff is not None
    print("all identical" if bad == 0 else f"{bad} case(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
