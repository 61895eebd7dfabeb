"""`tidesim validate`: the simulator's prediction vs the runtime's measurement, per configuration.

For every policy x budget x tau, one Schedule is built; the simulator predicts it with the
hardware profile and the runtime executes it on this machine (a CUDA GPU, or the CPU playing
the GPU). Writes results.json, results.parquet and predicted_vs_measured.png to the results
folder. Exit status 0 whatever the errors (it reports, it does not judge); 2 on bad input,
before any work. Needs torch (the `runtime` extra), imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tidesim.budget import live_budget
from tidesim.cli.calibrate_cmd import require_runtime
from tidesim.cli.cpu_kernel_arg import add_cpu_kernel_arg, profile_kernel, use_cpu_kernel
from tidesim.cli.guard import Output, declare_outputs
from tidesim.cli.output import format_table, print_json, progress, to_jsonable
from tidesim.errors import InputError
from tidesim.limits import check_cpu_workers
from tidesim.notes import noting
from tidesim.policies.options import REFRESH_MODES
from tidesim.policies.registry import entry, plan_policy, plan_runner, traits

DEFAULT_POLICIES = "cpu-routing,fiddler,tide,full-swap,all-gpu"
RESULT_FILES = ("results.json", "results.parquet", "predicted_vs_measured.png", "configurations.jsonl")
WINDOWS = ("first", "after-first-block")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="run Schedules on this machine with the runtime and compare with the simulator",
        description="For every configuration (policy x budget x tau) build one Schedule, predict it with the "
                    "simulator and the hardware profile, execute it with the runtime, and report both with "
                    "the step-time error (predicted - measured) / measured. Exit 0 whatever the errors.")
    p.add_argument("--trace", required=True, metavar="T", help="trace file or bundled trace name")
    p.add_argument("--hw", required=True, metavar="FILE",
                   help="hardware profile of THIS machine (from `tidesim calibrate`), name or YAML path")
    p.add_argument("--policies", default=DEFAULT_POLICIES, metavar="P1,P2",
                   help=f"policies to validate (default {DEFAULT_POLICIES})")
    p.add_argument("--budgets", default=None, metavar="B1,B2",
                   help="GPU expert slots per MoE layer (default: half the experts)")
    p.add_argument("--taus", default=None, metavar="T1,T2",
                   help="refresh intervals for tide policies (default: one, by the rule of every command: the "
                        "plan's best single tau with --plan, else the analytic best for this trace and profile)")
    p.add_argument("--refresh", default="sync", metavar="MODE[,MODE]",
                   help=f"tide refresh copies, one or more of {','.join(REFRESH_MODES)} (sync); several run in one "
                        "process on one executor")
    p.add_argument("--plan", metavar="FILE", help="also validate the planned policy with this plan")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="run only the first N MoE layers (no dense layers or lm_head on either side)")
    p.add_argument("--forwards", type=int, default=None, metavar="N", help="only N forwards of the window (speed)")
    p.add_argument("--window", choices=WINDOWS, default="first",
                   help="which forwards: from the first (first), or from the first forward after the first "
                        "prompt's first generated block (after-first-block)")
    p.add_argument("--prompts", metavar="0,1", help="only these prompts of the trace")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="the GPU side: cuda, cpu (the CPU plays the GPU) or auto")
    p.add_argument("--cpu-workers", type=int, default=None, metavar="N",
                   help="CPU worker pool size; must equal the profile's (the default), which the simulator uses")
    add_cpu_kernel_arg(p)
    p.add_argument("--repeats", type=int, default=1, metavar="R",
                   help="measure each configuration R times, interleaved; the median run is kept (1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    p.add_argument("-o", "--output", required=True, metavar="RESULTS_DIR", help="results folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    declare_outputs(p, Output("output", "--output", folder=True, contents=RESULT_FILES))


def run(args: argparse.Namespace) -> int:
    require_runtime()
    from tidesim_runtime.engine.device import select_device
    from tidesim_runtime.engine.executor import first_layers
    from tidesim_runtime.measure.validate import (
        Config,
        check_inputs,
        configurations,
        figure,
        summary,
        validate,
        window,
    )

    from tidesim.hardware import not_this_machine
    from tidesim.plan import load_plan
    from tidesim.policies import policy_names
    from tidesim.scenario import int_list, profile_of, prompt_ids, read_inputs

    # ----- every check before any work ----------------------------------------------------------
    known = policy_names()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise InputError(f"unknown policy {args.policies!r}; use some of {', '.join(known)}")
    for name in policies:
        entry(name)                           # the registry's unknown-policy rule
    if args.repeats < 1:
        raise InputError("--repeats must be at least 1")
    check_cpu_workers(args.cpu_workers)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} exists and is not a folder")
    trace_path, trace, workload = read_inputs(args.trace)     # the trace lookup and --prompts of every command
    full_model = workload.model
    if args.prompts is not None:              # an empty --prompts= is refused, not "all prompts"
        workload = workload.select_prompts(prompt_ids(args.prompts, trace.prompt_ids))
    if args.forwards is not None and args.forwards < 1:
        raise InputError("--forwards must be at least 1")
    refresh = [m.strip() for m in args.refresh.split(",") if m.strip()]
    if not refresh or any(m not in REFRESH_MODES for m in refresh):
        raise InputError(f"--refresh takes one or more of {', '.join(REFRESH_MODES)}, got {args.refresh!r}")
    workload = window(workload, args.forwards, args.window == "after-first-block")
    plan = load_plan(args.plan) if args.plan else None
    if plan is not None:
        plan.check_model(full_model)
        if plan_runner(plan.policy) != plan_policy():
            raise InputError(f"validate --plan runs plans for tide (the {plan_policy()} policy); this plan is for "
                             f"{plan.policy}: validate {plan.policy} with --policies and a single --taus instead")
        if plan_policy() not in policies:
            policies.append(plan_policy())
    elif any(traits(p).needs_plan for p in policies):
        raise InputError(f"the {plan_policy()} policy needs --plan FILE (make one with `tidesim plan`)")
    if args.layers is not None:
        workload = first_layers(workload, args.layers)
    hw = profile_of(args.hw)
    not_here = not_this_machine(hw)       # warnings, shown once every input is checked
    warnings = ([not_here] if not_here else []) + (plan.input_differences(trace_path, hw) if plan else [])
    if args.cpu_workers is not None and args.cpu_workers != hw.cpu.workers:
        raise InputError(f"--cpu-workers {args.cpu_workers} differs from the profile's {hw.cpu.workers} worker(s), "
                         "which the simulator uses and its CPU curve was measured with; leave it out, or "
                         f"calibrate with --cpu-workers {args.cpu_workers}")
    measured_with = profile_kernel(hw)
    if args.cpu_kernel is not None and args.cpu_kernel != measured_with:
        raise InputError(f"--cpu-kernel {args.cpu_kernel} differs from the profile's {measured_with}, which its CPU "
                         f"curve was measured with; leave it out, or calibrate with --cpu-kernel {args.cpu_kernel}")
    device = select_device(args.device, hw.cpu.workers)
    use_cpu_kernel(args.cpu_kernel, device.dtype, measured_with)
    experts = workload.num_experts
    budgets = int_list(args.budgets, "--budgets") if args.budgets is not None else [live_budget(experts)]
    tau_choice, tau_notes = None, frozenset[str]()
    if args.taus is not None:
        taus = int_list(args.taus, "--taus")
    elif any(traits(p).uses_tau for p in policies) and 0 <= budgets[0] <= experts:   # else check_inputs says why
        from tidesim.scenario import assemble

        # the default-tau rule as every command resolves it; the profile was checked against this machine above
        scenario = assemble(str(trace_path), workload, hw, policies, budget=budgets[0], refresh=refresh[0],
                            plan=plan, allow_roofline=True)
        tau_choice, tau_notes = scenario.tau_choice, frozenset(scenario.notes)
        assert tau_choice is not None            # a policy here uses tau
        taus = [tau_choice.tau]
    else:
        taus = [1]      # no policy here refreshes on an interval
    configs = configurations([p for p in policies if not traits(p).needs_plan], budgets, taus, refresh, experts)
    if plan is not None:
        configs.append(Config(plan_policy(), max(plan.budget[:workload.num_layers]), None, plan.refresh))
    check_inputs(workload, configs, device, plan)
    for line in warnings:
        print(f"tidesim: warning: {line}", file=sys.stderr)

    # ----- work -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    bar = progress(range(len(configs)), desc="validate", total=len(configs))
    done = IncrementalResults(out / "configurations.jsonl")

    def measured(o: Any) -> None:
        done.add(configuration_record(o))
        next(bar, None)

    outcomes, run_notes = noting(lambda: validate(workload, hw, configs, device, repeats=args.repeats, plan=plan,
                                                  seed=args.seed, on_done=measured))
    notes = sorted(tau_notes | run_notes)
    elapsed = time.perf_counter() - t0
    rows = [o.row() for o in outcomes]
    stats = summary(outcomes)
    setup = {
        "trace": str(trace_path), "model": workload.model.name, "kv_cache": workload.kv_cache,
        "forwards": workload.num_forwards, "window": args.window, "moe_layers": workload.num_layers,
        "layers_note": (f"only the first {workload.num_layers} of {full_model.num_moe_layers} MoE layers run; "
                        "dense layers and lm_head are left out on both sides") if args.layers is not None else
                       "the whole model runs",
        "hw": hw.name, "hw_provenance": hw.provenance.kind, "device": device.describe(),
        "repeats": args.repeats, "seed": args.seed, "seconds": round(elapsed, 1),
        "tau_choice": tau_choice.to_dict() if tau_choice else None, "hw_warning": not_here,
    }
    result = {"setup": setup, "summary": stats, "rows": rows,
              "configurations": [configuration_record(o) for o in outcomes],
              "flags": notes}
    write_results(out, result, outcomes, figure, f"{workload.model.name}, {workload.kv_cache} cache, "
                  f"{workload.num_forwards} forwards, {hw.name}")
    if args.json:
        print_json(result)
        return 0
    print(f"validated {len(configs)} configurations on {device.describe()} in {elapsed:.0f} s; "
          f"{setup['layers_note']}")
    if tau_choice is not None:
        print(tau_choice.line)
    cols = ["config", "predicted_step_ms", "measured_step_ms", "error", "hit_ratio", "expert_copies"]
    heads = ["configuration", "predicted ms", "measured ms", "error", "hit ratio", "copies"]
    print(format_table(heads, [[r[c] for c in cols] for r in rows]))
    print(f"median |error| {stats['median_abs_error']:.1%}, max {stats['max_abs_error']:.1%}; "
          f"results in {out}/ (results.json, results.parquet, predicted_vs_measured.png)")
    for flag in notes:
        print(f"note: {flag}")
    return 0


def configuration_record(o: Any) -> dict[str, Any]:
    """One configuration's result: its row, both full Metrics and every repeat's step time."""
    return {"config": o.config.label, "row": o.row(), "predicted": o.predicted.to_dict(),
            "measured": o.measured.to_dict(), "measured_step_s": o.repeats_s, "probe_s": o.probe_s,
            "probe_expected_s": o.probe_expected_s}


class IncrementalResults:
    """configurations.jsonl, rewritten (temp file, then rename) after every configuration is
    measured: a run stopped from outside (a timeout) leaves every configuration it finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(to_jsonable(record), sort_keys=True))
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        tmp.replace(self.path)


def write_results(out: Path, result: dict[str, Any], outcomes: list[Any], figure: Any, title: str) -> None:
    """Write everything into a temporary folder beside `out`, then move the files in (nothing
    half-written on error)."""
    import pandas as pd

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "results.json").write_text(json.dumps(to_jsonable(result), indent=2, sort_keys=True) + "\n")
        pd.DataFrame(result["rows"]).to_parquet(tmp / "results.parquet", index=False)
        figure(outcomes, tmp / "predicted_vs_measured.png", title)
        write_page(tmp, result, title)
        out.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "results.parquet", "predicted_vs_measured.png", "index.html"):
            shutil.move(str(tmp / f), str(out / f))


def write_page(folder: Path, result: dict[str, Any], title: str) -> Path:
    """index.html of the results folder: the configurations table, the figure, the files."""
    from tidesim.html_report import Link, Report, Section, Table, write_report

    cols = ["config", "predicted_step_ms", "measured_step_ms", "error", "hit_ratio", "expert_copies"]
    heads = ["configuration", "predicted ms", "measured ms", "error", "hit ratio", "copies"]
    stats = result["summary"]
    section = Section("predicted vs measured", paragraphs=[
        f"{result['setup']['device']}; {result['setup']['layers_note']}",
        f"median |error| {stats['median_abs_error']:.1%}, max {stats['max_abs_error']:.1%}; "
        "error = (predicted - measured) / measured step time"],
        tables=[Table(heads, [[r[c] for c in cols] for r in result["rows"]])],
        figures=["predicted_vs_measured.png"],
        links=[Link("results.json", "results.json", "everything, including both sides' metrics"),
               Link("results.parquet", "results.parquet", "one row per configuration")])
    return write_report(Report(f"tidesim validate: {title}", sections=[section]), folder)
