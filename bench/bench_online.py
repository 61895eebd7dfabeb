"""Online policies: the cost of deciding forward by forward, and of decoding through the live engine.

decide (default): how long each online policy takes to decide one forward, layer by layer as the
live engine does (one step call per MoE layer with that layer's routing), on a bundled trace.
  Usage: .venv/bin/python bench/bench_online.py decide [TRACE] [--budget B] [--tau T] [--refresh sync|async]
         [--forwards N] [--policies P,Q]
  Goal (issue #12): at most 1 ms per forward for mini shapes (19 MoE layers x 256 experts) on one
  core. The process is pinned to one core where the OS allows it (os.sched_setaffinity) and numpy's
  threads to one. Reports the median and 99th percentile per forward, in wall-clock and in process
  CPU time (the steadier figure on a shared machine), over the forwards after the first; the first
  forward's wall-clock time is reported apart (it loads what a policy prepares on first use, e.g.
  tide-split's compiled one-layer code: tidesim.policies.rowsplit).
engine: the time per forward of a decode through the live engine (tidesim generate) against the
replay executor running the Schedule that decode executed, on the same trace and device.
  Usage: .venv/bin/python bench/bench_online.py engine [--config tiny] [--layers N] [--policies P1,P2]
  Goal (issue #12): the live engine costs at most 10% more per forward than the replay. Each
  policy runs --repeats times, live and replay interleaved; the medians are compared.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from tidesim.budget import live_budget  # noqa: E402
from tidesim.bundled.paths import resolve_trace  # noqa: E402
from tidesim.hardware import get_profile  # noqa: E402
from tidesim.policies import PolicyOptions, build_schedule, uniform  # noqa: E402
from tidesim.policies.driver import online_names, online_policy  # noqa: E402
from tidesim.policies.registry import traits  # noqa: E402
from tidesim.policies.step import forward_metas  # noqa: E402
from tidesim.trace.io import read_trace  # noqa: E402
from tidesim.workload import workload_from_trace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what")
    d = sub.add_parser("decide")
    d.add_argument("trace", nargs="?", default="llada2-mini_prefix_g1024")
    d.add_argument("--budget", type=int, default=64)
    d.add_argument("--tau", type=int, default=2)
    d.add_argument("--hw", default="h100-sxm-pcie5")
    d.add_argument("--refresh", choices=("sync", "async"), default="sync", help="refresh mode of tau policies (sync)")
    d.add_argument("--forwards", type=int, default=200, help="forwards timed per policy (200)")
    d.add_argument("--policies", default=None, help="comma-separated online policies (default: all)")
    e = sub.add_parser("engine")
    e.add_argument("--config", default="tiny")
    e.add_argument("--layers", type=int, default=None)
    e.add_argument("--policies", default="tide,full-swap,all-gpu", help="policies that need no static set")
    e.add_argument("--budget", type=int, default=None, help="default: half the experts")
    e.add_argument("--gen-length", type=int, default=64)
    e.add_argument("--block-length", type=int, default=32)
    e.add_argument("--kv-cache", default="none")
    e.add_argument("--threshold", type=float, default=1.0, help="1.0 commits one token per step (more forwards)")
    e.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(sys.argv[1:] if sys.argv[1:2] in (["decide"], ["engine"]) else ["decide", *sys.argv[1:]])
    if args.what == "engine":
        engine(args)
    else:
        decide(args)


def decide(args: argparse.Namespace) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    workload = workload_from_trace(read_trace(resolve_trace(args.trace)))
    n = min(args.forwards, workload.num_forwards)
    workload = workload.select(np.arange(n))
    hw = get_profile(args.hw)
    f, l, e = workload.expert_tokens.shape
    print(f"{args.trace}: {f} forwards x {l} MoE layers x {e} experts, budget {args.budget}, tau {args.tau}, "
          f"{args.refresh} refresh; one step call per layer")
    print(f"{'policy':16s} {'median us':>10s} {'p99 us':>8s} {'cpu median us':>14s} {'first ms':>9s}  goal 1000 us")
    metas = forward_metas(workload)
    names = online_names() if args.policies is None else [p.strip() for p in args.policies.split(",") if p.strip()]
    for name in names:
        options = PolicyOptions(budget=uniform(args.budget, l), tau=uniform(args.tau, l), hw=hw, refresh=args.refresh)
        if traits(name).static_set:
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
        first = wall[0]
        if n > 1:
            wall, cpu = wall[1:], cpu[1:]
        med, p99 = np.median(wall) * 1e6, np.percentile(wall, 99) * 1e6
        print(f"{name:16s} {med:10.0f} {p99:8.0f} {np.median(cpu) * 1e6:14.0f} {first * 1e3:9.1f}  "
              f"{'ok' if med <= 1000 else 'MISSED'}")


def engine(args: argparse.Namespace) -> None:
    import torch
    from tidesim_runtime.engine.device import select_device
    from tidesim_runtime.engine.executor import Executor
    from tidesim_runtime.measure.deploy import LiveEngine, bind_host_experts
    from tidesim_runtime.reference.capture import CaptureSettings
    from tidesim_runtime.reference.checkpoint import with_layers
    from tidesim_runtime.reference.generate import DecodeConfig
    from tidesim_runtime.reference.model import build_model

    from tidesim.models import get_model

    spec = with_layers(get_model(args.config), args.layers, at_most_spec=False)
    layers, experts = spec.num_moe_layers, spec.num_experts
    budget = args.budget if args.budget is not None else live_budget(experts)
    device = select_device("cpu", 1)
    cfg = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, kv_cache=args.kv_cache,
                       threshold=args.threshold)
    prompt = [[(7 * i + 3) % (spec.vocab_size - 2) for i in range(16)]]
    size = 16 + args.gen_length + args.block_length
    model = build_model(spec, device.dtype, seed=0)
    banks = bind_host_experts(model)
    hw = get_profile("dev-2core-cpu")
    print(f"{spec.name}: {layers} MoE layers x {experts} experts, budget {budget}, {device.describe()}, "
          f"gen {args.gen_length}, block {args.block_length}, kv {args.kv_cache}")
    print(f"{'policy':12s} {'live ms/fwd':>12s} {'replay ms/fwd':>14s} {'ratio':>6s} {'decide ms/fwd':>14s}")
    for name in args.policies.split(","):
        opts = PolicyOptions(budget=uniform(budget, layers), tau=uniform(2, layers), hw=hw)
        live_s, replay_s, decide_s = [], [], []
        for _ in range(args.repeats):
            eng = LiveEngine(model, online_policy(name, spec, opts), device, banks, size, size)
            res = eng.run(prompt, cfg, CaptureSettings("random (seed 0)", device.dtype_name), seed=None)
            live_s.append(float(res.forwards["time_s"].mean()))
            decide_s.append(float(res.forwards["decide_s"].mean()))
            workload = workload_from_trace(res.trace)
            with Executor(spec, layers, device, size, size, seed=0) as ex:
                replay_s.append(ex.replay(workload, res.schedule, warmup=1).step_time_s)
        live, replay = float(np.median(live_s)), float(np.median(replay_s))
        print(f"{name:12s} {live * 1e3:12.2f} {replay * 1e3:14.2f} {live / replay:6.2f} "
              f"{np.median(decide_s) * 1e3:14.2f}")
    del torch


if __name__ == "__main__":
    main()
