"""CPU expert kernels against this machine's own memory bandwidth (issue 25).

A routed expert at a few tokens streams its weights from DRAM once, so its time has a floor:
weight bytes / read bandwidth. For each model shape (llada2-mini, llada2-flash), dtype, thread
count (1 and all) and CPU expert kernel (tidesim_runtime.engine.cpu_kernels), this times one
pass of the kernel over a bank of distinct experts whose weights exceed the last-level cache
(twice it by default), at each token count, and a STREAM-like read (torch.sum over a buffer of
the same size, same thread count) in the same rounds. Rounds interleave every cell, so load from
other jobs falls on all of them alike, and every pass is paired with a read of the same size
just before it. Printed per row: time per expert (best and median pass), achieved GB/s (weight
bytes / best time), the best read bandwidth of the cell's rounds, and the ratio: the median over
rounds of (pass GB/s / its own read's GB/s).

Two paths (--paths): `call` times one kernel call per expert from Python (kernel.run, a new
output tensor each); `pool` times what the runtime's CPU pool runs: one layer job of all the
bank's experts submitted to a CPUPool of one worker with the thread count
(engine/cpu_pool.py: with avx2-stream the whole list is one foreign call per worker; the other
kernels one call per expert), waited for, divided by the experts; `pool-each` the same job with
one queue entry and one kernel call per expert (the pool's path before the list, for every
kernel).

    .venv/bin/python bench/bench_cpu_experts.py [--models llada2-mini,llada2-flash]
        [--dtypes bfloat16,float32] [--tokens 1,2,4,8,16,32,64] [--threads 1,all]
        [--kernels linear,weights-left,...] [--paths call,pool] [--working-set-mib N] [--repeats 3]
        [--json FILE]
    .venv/bin/python bench/bench_cpu_experts.py --dry     # tiny sizes, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from tidesim_runtime.engine import cpu_kernels, kt_backend
from tidesim_runtime.engine.cpu_pool import CPUPool, ExpertTask, expert_task_runner
from tidesim_runtime.engine.device import cpu_model_name, last_level_cache_bytes

from tidesim.models import PRESETS, ModelSpec

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PATHS = ("call", "pool", "pool-each")
MIB = 2**20


@dataclass
class Row:
    model: str
    dtype: str
    threads: int
    kernel: str
    path: str
    tokens: int
    experts: int
    expert_mb: float
    best_us: float
    median_us: float
    gbs: float
    read_gbs: float
    ratio: float


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        sys.exit(f"bench_cpu_experts: {what} is empty; give a comma-separated list")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llada2-mini,llada2-flash")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64")
    p.add_argument("--threads", default="1,all", help="thread counts; 'all' = the usable cores")
    p.add_argument("--kernels", default=",".join(cpu_kernels.KERNELS))
    p.add_argument("--paths", default="call",
                   help="call (one kernel call per expert), pool (the pool's layer job), pool-each (the same job, "
                        "one queue entry per expert)")
    p.add_argument("--working-set-mib", type=float, default=None,
                   help="weights per bank (default: twice the last-level cache)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dry", action="store_true", help="tiny sizes: tiny model, 4 MiB, tokens 1,4, one repeat")
    p.add_argument("--json", metavar="FILE", help="also write the rows and the setup as JSON")
    args = p.parse_args(argv)
    if args.dry:
        args.models, args.tokens, args.threads, args.repeats = "tiny", "1,4", "1", 1
        args.working_set_mib = args.working_set_mib or 4.0
        if args.kernels == p.get_default("kernels"):
            args.kernels = "linear,weights-left,onednn-packed"
    return args


def check(args: argparse.Namespace) -> None:
    """Every input checked before any work: exit 2 with one line."""
    def bad(msg: str) -> None:
        print(f"bench_cpu_experts: {msg}", file=sys.stderr)
        sys.exit(2)
    for m in parse_list(args.models, "--models"):
        if m not in PRESETS:
            bad(f"--models: unknown model {m!r}; use one of {', '.join(PRESETS)}")
    for d in parse_list(args.dtypes, "--dtypes"):
        if d not in DTYPES:
            bad(f"--dtypes: unknown dtype {d!r}; use bfloat16 or float32")
    for k in parse_list(args.kernels, "--kernels"):
        if k not in cpu_kernels.KERNELS:
            bad(f"--kernels: unknown kernel {k!r}; use some of {', '.join(cpu_kernels.KERNELS)}")
    for pa in parse_list(args.paths, "--paths"):
        if pa not in PATHS:
            bad(f"--paths: unknown path {pa!r}; use some of {', '.join(PATHS)}")
    for t in parse_list(args.tokens, "--tokens"):
        if not t.isdigit() or not 1 <= int(t) <= 4096:
            bad(f"--tokens: {t!r} is not a token count in 1..4096")
    for t in parse_list(args.threads, "--threads"):
        if t != "all" and (not t.isdigit() or int(t) < 1):
            bad(f"--threads: {t!r} is neither 'all' nor a positive integer")
    if not 1 <= args.repeats <= 1000:
        bad(f"--repeats must lie in 1..1000, got {args.repeats}")
    ws = args.working_set_mib
    if ws is not None and not (math.isfinite(ws) and 0 < ws <= 64 * 1024):
        bad(f"--working-set-mib must be a finite size in (0, 65536], got {ws}")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_counts(text: str) -> list[int]:
    out = [usable_cores() if t == "all" else int(t) for t in parse_list(text, "--threads")]
    return list(dict.fromkeys(out))


def expert_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    return 3 * spec.hidden_size * spec.moe_intermediate_size * torch.empty(0, dtype=dtype).element_size()


class Bank:
    """n distinct experts' weights (w13 [n, 2I, H], w2 [n, H, I]) of scale 1/sqrt(fan-in)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, n: int, gen: torch.Generator) -> None:
        h, i = spec.hidden_size, spec.moe_intermediate_size
        self.w13 = torch.empty(n, 2 * i, h, dtype=dtype)
        self.w2 = torch.empty(n, h, i, dtype=dtype)
        for e in range(n):  # every expert its own values: no page or cache line is shared
            self.w13[e].copy_(torch.randn(2 * i, h, generator=gen) / math.sqrt(h))
            self.w2[e].copy_(torch.randn(h, i, generator=gen) / math.sqrt(i))
        self.n = n


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def measure_config(spec: ModelSpec, dtype: torch.dtype, threads: int, kernels: list[str], tokens: list[int],
                   ws_bytes: int, repeats: int, paths: tuple[str, ...] = ("call",)) -> list[Row]:
    """Rows of one (model, dtype, thread count): every kernel on every path at every token count,
    with the read bandwidth of the same rounds."""
    torch.set_num_threads(threads)
    per = expert_bytes(spec, dtype)
    n = max(2, math.ceil(ws_bytes / per))
    gen = torch.Generator().manual_seed(0)
    bank = Bank(spec, dtype, n, gen)
    stream = torch.ones(n * per // 4, dtype=torch.float32)
    xs = {t: torch.randn(t, spec.hidden_size, generator=gen).to(dtype) for t in tokens}
    usable = [k for k in kernels
              if cpu_kernels.KERNELS[k].supports(dtype) and not cpu_kernels.KERNELS[k].why_unusable()]

    # the pool path: every expert its own rows of one activation buffer, as in a layer job
    pooled = "pool" in paths or "pool-each" in paths
    xp = {t: torch.randn(n * t, spec.hidden_size, generator=gen).to(dtype) for t in tokens} if pooled else {}
    pool = CPUPool(1, threads) if pooled else None

    def one_pass(k: str, path: str, t: int) -> None:
        if path == "call":
            kernel = cpu_kernels.KERNELS[k]
            for e in range(n):
                kernel.run(xs[t], bank.w13[e], bank.w2[e])
            return
        assert pool is not None
        before = cpu_kernels.current().name
        cpu_kernels.use(k)
        try:
            runner = expert_task_runner(xp[t], torch.empty_like(xp[t]), bank.w13, bank.w2)
            tasks = [ExpertTask(e, e * t, (e + 1) * t) for e in range(n)]
            pool.submit(tasks, runner if path == "pool" else (lambda task: runner(task))).wait()
        finally:
            cpu_kernels.use(before)

    cells = [(k, pa, t) for k in usable for pa in paths for t in tokens]
    try:
        with torch.inference_mode():
            for k, pa, t in cells:  # warm-up: primitives, packing, compilation
                one_pass(k, pa, t)
            samples: dict[tuple[str, str, int], list[tuple[float, float]]] = {c: [] for c in cells}
            for _ in range(repeats):
                for c in cells:   # each pass paired with a read of the same size just before it
                    read = timed(stream.sum)
                    samples[c].append((read, timed(lambda c=c: one_pass(*c)) / n))
    finally:
        if pool is not None:
            pool.close()
    cpu_kernels.PACKED.clear()
    kt_backend.BACKEND.clear()
    rows = []
    read_bytes = stream.numel() * 4
    for (k, pa, t), s in samples.items():
        best = min(x for _, x in s)
        # the ratio of a pass to its own read (the median over rounds): load from other jobs that
        # comes and goes between rounds falls on both halves of a pair alike
        ratio = statistics.median((per / x) / (read_bytes / r) for r, x in s)
        gbs = per / best / 1e9
        rows.append(Row(spec.name, str(dtype).replace("torch.", ""), threads, k, pa, t, n, per / 1e6, best * 1e6,
                        statistics.median(x for _, x in s) * 1e6, gbs, read_bytes / min(r for r, _ in s) / 1e9,
                        ratio))
    return rows


def table(rows: list[Row]) -> str:
    head = (f"{'model':<13} {'dtype':<9} {'thr':>3} {'kernel':<14} {'path':<9} {'tok':>4} {'best us':>9} "
            f"{'median us':>10} {'GB/s':>6} {'read GB/s':>9} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.model:<13} {r.dtype:<9} {r.threads:>3} {r.kernel:<14} {r.path:<9} {r.tokens:>4} "
                     f"{r.best_us:>9.1f} {r.median_us:>10.1f} {r.gbs:>6.2f} {r.read_gbs:>9.2f} {r.ratio:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check(args)
    ws = int(args.working_set_mib * MIB) if args.working_set_mib else 2 * last_level_cache_bytes()
    tokens = [int(t) for t in parse_list(args.tokens, "--tokens")]
    kernels = parse_list(args.kernels, "--kernels")
    threads_before = torch.get_num_threads()
    rows: list[Row] = []
    try:
        for m in parse_list(args.models, "--models"):
            for d in parse_list(args.dtypes, "--dtypes"):
                for th in thread_counts(args.threads):
                    rows += measure_config(PRESETS[m], DTYPES[d], th, kernels, tokens, ws, args.repeats,
                                           tuple(parse_list(args.paths, "--paths")))
    finally:
        torch.set_num_threads(threads_before)
    print(f"{cpu_model_name()}, {usable_cores()} usable cores, working set {ws / MIB:.0f} MiB per bank, "
          f"{args.repeats} rounds, torch {torch.__version__}")
    print(table(rows))
    for k in kernels:
        why = cpu_kernels.KERNELS[k].why_unusable()
        if why:
            print(f"{k}: not measured: {why}")
            continue
        for d in parse_list(args.dtypes, "--dtypes"):
            why = cpu_kernels.KERNELS[k].why_not_dtype(DTYPES[d])
            if why:
                print(f"{k}: {d} not measured: {why}")
    if args.json:
        setup = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_model_name(),
                 "cores": usable_cores(), "platform": platform.platform(), "torch": torch.__version__,
                 "working_set_bytes": ws, "repeats": args.repeats, "dry": args.dry,
                 "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=1))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
