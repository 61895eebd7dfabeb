"""`tidesim calibrate`: measure this machine with the runtime's kernels and write a hardware profile.

Needs torch (the `runtime` extra); it is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.cli.cpu_kernel_arg import add_cpu_kernel_arg, chosen_kernel, use_cpu_kernel
from tidesim.cli.guard import Output, declare_outputs
from tidesim.cli.output import format_table, print_json, progress
from tidesim.errors import InputError
from tidesim.limits import check_cpu_workers
from tidesim.models import ModelSpec, get_model
from tidesim.notes import noting

INSTALL_HINT = "this command needs torch: pip install 'tidesim[runtime]'"


def require_runtime() -> None:
    """InputError (exit 2, one line) when torch or the runtime package is missing."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("tidesim_runtime") is None:
        raise InputError(INSTALL_HINT)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="measure this machine (GPU, copies, CPU) with the runtime's kernels -> hardware profile",
        description="Measure expert FFN time (GPU side and CPU worker pool), attention, copies, launch and "
                    "layer overheads with the kernels the runtime executes, and write a hardware profile "
                    "(YAML) with full provenance. Without a CUDA GPU (or with --device cpu) the GPU side is "
                    "the CPU and copies are memcpy; the profile says so.")
    p.add_argument("--quick", action="store_true", help="fewer points and repeats (about 30 s on 2 cores)")
    p.add_argument("--models", default="llada2-mini,llada2-flash", metavar="M1,M2",
                   help="model shapes to measure (presets or config.json paths; default llada2-mini,llada2-flash)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="the GPU side: cuda, cpu (the CPU plays the GPU) or auto (cuda when present)")
    p.add_argument("--cpu-workers", type=int, default=None, metavar="N",
                   help="CPU worker pool size the runtime will use (default: the fastest even split of the "
                        "spare cores, measured here)")
    add_cpu_kernel_arg(p, auto=True)
    p.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="profile to write (.yaml)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    p.set_defaults(func=run)
    declare_outputs(p, Output("output", "--output", (".yaml", ".yml")))


def parse_models(text: str) -> list[ModelSpec]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise InputError("--models needs at least one model")
    return [get_model(n) for n in names]


def run(args: argparse.Namespace) -> int:
    require_runtime()
    models = parse_models(args.models)
    out = Path(args.output)
    if out.suffix not in (".yaml", ".yml"):
        raise InputError(f"--output {out}: give a .yaml file name")
    check_cpu_workers(args.cpu_workers)
    from tidesim_runtime.measure.calibrate import calibrate

    if args.cpu_kernel not in (None, "auto"):
        chosen_kernel(args.cpu_kernel)   # a bad name is refused before any work
    t0 = time.perf_counter()
    device, choices = choose_cpu_pool(args, models[0])
    name = args.name or out.stem

    def run_steps(steps: list[tuple[str, Callable[[], None]]]) -> None:
        for _, step in progress(steps, desc="calibrate"):
            step()

    profile = calibrate(models, device, args.quick, name, progress=run_steps)
    profile.save(out)
    elapsed = time.perf_counter() - t0
    summary = summarize(profile, models)
    summary.update({"output": str(out), "seconds": round(elapsed, 1), "device": device.describe(),
                    "quick": bool(args.quick), "cpu_kernel": profile.cpu.kernel, "cpu_choices": choices})
    if args.json:
        print_json(summary)
        return 0
    print(f"profile {name!r} written to {out} in {elapsed:.0f} s ({device.describe()})")
    print(format_table(["quantity", "value"], [[k, v] for k, v in summary["table"]]))
    return 0


def choose_cpu_pool(args: argparse.Namespace, spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    """The device with the CPU pool's layout (--cpu-workers, else the fastest measured here) and
    the CPU expert kernel made the runtime's (--cpu-kernel; `auto`: the fastest measured here).
    Returns the device and what was measured to choose (seconds per expert per candidate)."""
    from tidesim_runtime.engine.device import select_device
    from tidesim_runtime.measure.cpu_choice import choose_kernel, choose_layout, layouts, pool_cores

    rounds = 1 if args.quick else 2
    device = select_device(args.device, args.cpu_workers)
    choices: dict[str, Any] = {}
    use_cpu_kernel(None if args.cpu_kernel == "auto" else args.cpu_kernel, device.dtype)
    if args.cpu_workers is None and len(layouts(pool_cores(device))) > 1:
        layout = choose_layout(spec, device, rounds)
        choices["layout"] = layout.seconds
        device = select_device(args.device, int(layout.chosen.split("x")[0]))
    if args.cpu_kernel == "auto":
        kernel = choose_kernel(spec, device, rounds)
        choices["kernel"] = kernel.seconds
        use_cpu_kernel(kernel.chosen, device.dtype)
    return device, choices


def summarize(profile: Any, models: list[ModelSpec]) -> dict[str, Any]:
    rows, said = noting(lambda: _summary_rows(profile, models))
    return {"table": rows, "name": profile.name, "flags": sorted(said)}


def _summary_rows(profile: Any, models: list[ModelSpec]) -> list[tuple[str, Any]]:
    """Headline numbers of a measured profile (what it predicts at a few points)."""
    rows: list[tuple[str, Any]] = [
        ("launch overhead (us)", profile.gpu.launch_overhead_us),
        ("layer overhead (us)", profile.gpu.layer_overhead_us),
        ("dense bandwidth (GB/s, model bytes)", profile.gpu.mem_bandwidth_gbs),
        ("dense FLOP rate (TFLOP/s)", profile.gpu.bf16_tflops),
        ("H2D (GB/s)", profile.pcie.h2d_gbs),
        ("D2H (GB/s)", profile.pcie.d2h_gbs),
        ("copies slow GPU compute by", profile.pcie.copy_slows_compute),
        ("copies slow the CPU pool by", profile.pcie.copy_slows_cpu),
        ("CPU task overhead (us)", profile.cpu.task_overhead_us),
        ("GPU side slows while the CPU pool runs by", profile.cpu.gpu_contention),
        ("CPU pool slows while the GPU side runs by", profile.cpu.pool_side_contention()),
    ]
    for spec in models:
        for t in (1, 8, 32):
            gpu = float(profile.gpu_expert_time(np.array([t]), spec)[0]) * 1e6
            cpu = float(profile.cpu_expert_time(np.array([t]), spec)[0]) * 1e6
            rows.append((f"{spec.name} expert @{t} tokens: GPU / CPU (us)", f"{gpu:,.1f} / {cpu:,.1f}"))
        copy = float(profile.h2d_time(float(spec.expert_bytes))) * 1e6
        rows.append((f"{spec.name} expert copy H2D (us)", round(copy, 1)))
    return rows
