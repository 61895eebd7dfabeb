"""Does calibrate's fixed-path timing (FixedPath, gpu.layer_fixed) time what the executor pays?
Replays one policy's Schedule on a window of a trace (first MoE layer only, cpu-as-gpu or CUDA)
and, right after each replay, times FixedPath at the window's median tokens and context: the
executor's own fixed per-layer time per forward (`gpu_fixed` of its breakdown) beside it.

    .venv/bin/python bench/bench_fixed_path.py --trace bench/results/validation-dev-2core-cpu/trace.parquet \\
        --hw hwprofiles/dev-2core-cpu.yaml --policy cpu-routing --budget 96 --start 1 --forwards 12

On a shared machine pairs taken seconds apart are the comparison that means something.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from tidesim_runtime.engine.device import PinnedThreads, select_device
from tidesim_runtime.engine.executor import Executor, first_layers
from tidesim_runtime.measure.validate import Config, SpeedProbe, build

from tidesim.hardware import load_profile
from tidesim.trace import read_trace
from tidesim.workload import workload_from_trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--hw", required=True, help="profile (the schedule's policy inputs)")
    p.add_argument("--policy", default="cpu-routing")
    p.add_argument("--budget", type=int, default=96)
    p.add_argument("--start", type=int, default=0, help="first forward of the window")
    p.add_argument("--forwards", type=int, default=12)
    p.add_argument("--pairs", type=int, default=4, help="replay + probe pairs")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    dev = select_device(args.device)
    if not dev.is_cuda:
        torch.set_num_threads(dev.gpu_threads)
    pinned = PinnedThreads(dev.cpu_set)
    hw = load_profile(args.hw)
    whole = first_layers(workload_from_trace(read_trace(args.trace)), 1)
    if not 0 <= args.start < whole.num_forwards:
        p.error(f"--start must lie in 0..{whole.num_forwards - 1}")
    w = whole.select(np.arange(args.start, min(args.start + args.forwards, whole.num_forwards)))
    t, c = int(np.median(w.tokens)), int(np.median(w.context))
    schedule = build(Config(args.policy, args.budget, 4, "sync"), w, hw, None)
    try:
        with Executor(w.model, 1, dev, int(w.tokens.max()), int(w.context.max()), seed=0) as ex:
            speed = SpeedProbe.of(w, hw, dev, ex.backend)      # validate's probe: FixedPath at the medians
            print(f"{args.policy} B={args.budget}, forwards {args.start}..{args.start + w.num_forwards - 1}, "
                  f"FixedPath at {t} tokens, context {c}; the profile charges {speed.expected_s * 1e3:.1f} ms")
            for _ in range(args.pairs):
                m = ex.replay(w, schedule, warmup=1)
                with torch.inference_mode():
                    probe = speed.sample_s()
                print(f"executor gpu_fixed {m.breakdown_s['gpu_fixed'] / w.num_forwards * 1e3:7.1f} ms/forward "
                      f"(step {m.step_time_s * 1e3:7.1f} ms) | FixedPath {probe * 1e3:7.1f} ms", flush=True)
    finally:
        pinned.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
