"""`tidesim demo`: the main job on bundled defaults.

For LLaDA2.0-mini and -flash (bundled traces in the public TIDE code's settings: no KV cache, gen
length 1024 and 256) on the H100 preset (and a measured CUDA profile when hwprofiles/ has one):
solve the per-layer plan on the calibration prompts, compare every policy on the held-out prompts
with the simulator at the GPU expert budget the public TIDE code would use, and write a report
folder of figures and tables.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.atomic import write_text
from tidesim.budget import memory_for_budget
from tidesim.default_tau import CANDIDATE_TAUS, tide_tokens_per_s
from tidesim.demo_figures import tau_figure, throughput_figure, timeline_figure
from tidesim.errors import InputError
from tidesim.evaluate import evaluate
from tidesim.formatting import to_jsonable
from tidesim.hardware import HardwareProfile, bundled_profiles, get_profile, load_profile
from tidesim.plan import Plan, plan_slots
from tidesim.planner import make_plan, split_prompts
from tidesim.policies import policy_names
from tidesim.policies.registry import baselines, reference_policy
from tidesim.procs import die_with_parent
from tidesim.report import Comparison, breakdown_figure, compare, kind_of
from tidesim.scenario import assemble, read_inputs, resolve_budget
from tidesim.sim.timeline import Timeline
from tidesim.trace.stats import hit_ratio_vs_tau
from tidesim.workload import Workload

DEFAULT_CASES = (("llada2-mini", "llada2-mini_none_g1024"), ("llada2-flash", "llada2-flash_none_g256"))
DEFAULT_PROFILE = "h100-sxm-pcie5"
PLAN_TAUS = list(CANDIDATE_TAUS)      # the same candidates as the default-tau rule of every command
# Per-layer budget candidates around the TIDE budget u (the planner's default grid runs u/4..2u;
# the demo keeps the part of it that the plans actually use, to stay within a minute).
PLAN_BUDGET_FACTORS = (0.5, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5)
TIMELINE_FORWARDS = 2


@dataclass
class CaseResult:
    """One (model, profile) comparison, with everything the table and figures show."""

    model: str
    trace: str
    hw: str
    budget: int
    tau: int
    tau_reason: str
    prompts: list[int]
    comparison: Comparison
    plan: Plan
    tau_tokens_per_s: dict[int, float]
    tau_hit_ratio: dict[int, float]
    figures: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.model} on {self.hw}"


def demo_profiles() -> list[HardwareProfile]:
    """The H100 preset, plus every measured profile of a CUDA GPU (a CPU-only measurement says
    nothing about GPU offloading, so it is left out)."""
    profiles = [get_profile(DEFAULT_PROFILE)]
    for name, path in bundled_profiles().items():
        prof = load_profile(path)
        if name != DEFAULT_PROFILE and prof.provenance.kind == "measured" and is_cuda_profile(prof):
            profiles.append(prof)
    return profiles


def _profile_ref(hw: HardwareProfile) -> str:
    """What a worker process loads the profile by: its bundled name or file path."""
    bundled = bundled_profiles()
    return str(bundled.get(hw.name, hw.name))


def is_cuda_profile(prof: HardwareProfile) -> bool:
    text = f"{prof.gpu.name} {prof.provenance.device}".lower()
    return any(word in text for word in ("nvidia", "cuda", "h100", "h200", "a100"))


def run_case(model_name: str, trace_name: str, hw: HardwareProfile, out: Path,
             step: Callable[[str], None]) -> CaseResult:
    trace_path, trace, workload = read_inputs(trace_name)
    model = trace.model
    budget = resolve_budget(None, None, workload, hw)[0]      # the default rule on the profile's GPU memory
    calib, held = split_prompts(trace.prompt_ids, None)
    step(f"{model_name}: planning on prompts {calib}")
    # The plan gets the memory that TIDE's uniform budget occupies, so every policy has the same memory.
    budgets = sorted({min(max(round(budget * f), 1), model.num_experts) for f in PLAN_BUDGET_FACTORS})
    # engine="sim": the plan is chosen among its candidates (the knapsack optimum, every single tau)
    # by the executor the demo compares with, so `planned` is not slower than tide at any of them.
    outcome = make_plan(trace_path, trace_name, hw, memory_for_budget(model, budget), taus=PLAN_TAUS,
                        budgets=budgets, engine="sim")
    tag = f"{model_name}_{hw.name}"
    outcome.plan.save(out / f"plan_{tag}.json")
    held_w = workload.select_prompts(held or calib)
    # the default-tau rule with a plan: the plan's best single tau (demo profiles may lack curves: roofline)
    scenario = assemble(trace_name, held_w, hw, policy_names(), budget=budget, plan=outcome.plan,
                        allow_roofline=True)
    choice = scenario.tau_choice
    assert choice is not None                   # tide runs, so the rule chose a tau
    tau = choice.tau
    metrics = []
    for policy in policy_names():
        step(f"{model_name}: simulating {policy}")
        metrics.append(evaluate(scenario, policy).metrics)
    comparison = compare(metrics)
    step(f"{model_name}: interval sweep")
    tau_tps = tau_sweep(held_w, hw, budget)
    tau_hit = hit_ratio_vs_tau(held_w, budget, PLAN_TAUS)
    result = CaseResult(model=model_name, trace=trace_name, hw=hw.name, budget=budget, tau=tau,
                        tau_reason=choice.line, prompts=held or calib, comparison=comparison, plan=outcome.plan,
                        tau_tokens_per_s=tau_tps, tau_hit_ratio=tau_hit)
    step(f"{model_name}: figures")
    setting = f"{model_name}, {hw.name}, budget {budget}/layer, held-out prompts {result.prompts}"
    title = f"{setting}; tide and tide-reference at tau {tau}"
    result.figures = [
        str(throughput_figure(comparison, out / f"throughput_{tag}.png", title)),
        str(breakdown_figure(comparison, out / f"breakdown_{tag}.png", title)),
        str(tau_figure(tau_tps, tau_hit, out / f"tau_{tag}.png", f"tide against the refresh interval: {setting}",
                       chosen=tau)),
        *timeline_excerpt(held_w, hw, budget, tau, out, tag),
    ]
    return result


def tau_sweep(workload: Workload, hw: HardwareProfile, budget: int) -> dict[int, float]:
    """Predicted tokens/s of tide for each tau (analytic engine, sync refresh: the default-tau rule's
    own figures)."""
    return tide_tokens_per_s(workload, hw, budget, "sync", PLAN_TAUS)


def timeline_excerpt(workload: Workload, hw: HardwareProfile, budget: int, tau: int, out: Path, tag: str
                     ) -> list[str]:
    """The first forwards of a generated block under tide: Chrome trace JSON (Perfetto) and a PNG."""
    steps = np.flatnonzero(workload.block >= 1)[:TIMELINE_FORWARDS]
    excerpt = workload.select(steps)
    tide = reference_policy()
    scenario = assemble(f"{tag} excerpt", excerpt, hw, [tide], budget=budget, tau=tau, allow_roofline=True)
    timeline = Timeline()
    evaluate(scenario, tide, timeline=timeline)
    json_path = out / f"timeline_{tag}.json"
    timeline.save(json_path)
    png = timeline_figure(timeline, out / f"timeline_{tag}.png",
                          f"tide timeline, first {len(steps)} forwards of block 1 ({tag})")
    return [str(png), str(json_path)]


TABLE_COLUMNS = ["policy", "kind", "tok/s", "speedup", "hit ratio", "H2D GB", "CPU share", "bound tok/s"]


def table_rows(result: CaseResult) -> list[list[Any]]:
    rows = []
    for m in result.comparison.metrics:
        sp = result.comparison.speedup(m)
        bound = m.generated_tokens / m.lower_bound_s if m.lower_bound_s else float("nan")
        label = kind_of(m) + ("" if m.feasible else ", does not fit")
        rows.append([m.policy, label, m.tokens_per_s, "-" if sp is None else f"{sp:.2f}x", m.hit_ratio,
                     m.h2d_bytes / 1e9, m.cpu_share, bound])
    return rows


def result_json(result: CaseResult) -> dict[str, Any]:
    """Everything but wall-clock solver times (those stay in the plan files), so identical runs give
    identical bytes."""
    plan = result.plan
    return {
        "model": result.model, "trace": result.trace, "hw": result.hw, "budget": result.budget, "tau": result.tau,
        "tau_reason": result.tau_reason,
        "heldout_prompts": result.prompts, "best_baseline": result.comparison.best_baseline,
        "policies": [
            {"policy": m.policy, "kind": kind_of(m), "tokens_per_s": m.tokens_per_s,
             "speedup_over_best_baseline": result.comparison.speedup(m), "hit_ratio": m.hit_ratio,
             "h2d_bytes": m.h2d_bytes, "cpu_share": m.cpu_share, "lower_bound_s": m.lower_bound_s,
             "total_time_s": m.total_time_s, "feasible": m.feasible}
            for m in result.comparison.metrics
        ],
        "plan": {"tau": plan.tau, "budget": plan.budget, "expert_slots": plan_slots(plan),
                 "objective_s": plan.objective_s, "lagrangian_bound_s": plan.oracle_bound_s, "gap": plan.gap,
                 "solver_status": plan.solver.status},
        "tau_tokens_per_s": result.tau_tokens_per_s, "tau_hit_ratio": result.tau_hit_ratio,
        "figures": [Path(f).name for f in result.figures],
    }


def _run_case_job(job: tuple[str, str, str, str]) -> CaseResult:
    model, trace, hw_name, out = job
    return run_case(model, trace, get_profile(hw_name), Path(out), lambda _: None)


def run_demo(out: Path, step: Callable[[str], None] = lambda _: None,
             cases: tuple[tuple[str, str], ...] = DEFAULT_CASES, workers: int | None = None) -> list[CaseResult]:
    """Every (profile, case) pair, in parallel processes (results do not depend on the order). The
    report is written into a temporary folder beside `out` and renamed to `out` at the end, so an
    interrupted or failed demo leaves no half-written report; a previous report at `out` is replaced."""
    check_report_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        results = _run_cases(tmp, step, cases, workers)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for r in results:
        r.figures = [str(out / Path(f).name) for f in r.figures]
    return results


def check_report_folder(out: Path) -> None:
    """`out` may be new, empty, or a previous report (which the demo replaces); anything else is refused,
    so the demo never deletes a folder of other files."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is a file, not a folder; give a folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise InputError(f"--out {out}: the folder holds other files and no tidesim report (summary.json); give a "
                         "new folder name")


def _replace_folder(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _run_cases(out: Path, step: Callable[[str], None], cases: tuple[tuple[str, str], ...],
               workers: int | None) -> list[CaseResult]:
    profiles = demo_profiles()
    jobs = [(model, trace, _profile_ref(hw), str(out)) for hw in profiles for model, trace in cases]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        results = [run_case(m, t, get_profile(h), out, step) for m, t, h, _ in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent,
                                                    initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_run_case_job, job) for job in jobs]
            for done, _ in enumerate(concurrent.futures.as_completed(futures), start=1):
                step(f"{done}/{len(jobs)} cases done")
            results = [f.result() for f in futures]
    write_text(out / "summary.json", json.dumps(to_jsonable([result_json(r) for r in results]), indent=2,
                                                sort_keys=True) + "\n")
    write_index(out, results)
    return results


FOOTNOTES = [
    f"speedup: tokens/s over the best baseline ({', '.join(baselines())}); bounds are limits, not "
    "deployable policies; bound tok/s: no schedule beats the busiest resource.",
    "oracle (a row of the table) is a policy that knows each forward's routing in advance and prefetches for "
    "free: an upper limit on what any expert placement can reach with this budget.",
    "Lagrangian bound (in the plan line) is the planner's lower bound on the time of any interval-refresh "
    "schedule with the plan's budgets; the gap says how far the plan could still improve within TIDE's method.",
]


def case_lines(r: CaseResult) -> list[str]:
    """What the demo says about one case, under its table (the command and the HTML page alike)."""
    plan = r.plan
    lines = [f"trace {r.trace}, held-out prompts {r.prompts}, budget {r.budget} experts/layer (as the public TIDE "
             f"code sizes it); {r.tau_reason}"]
    reference = reference_policy()
    tide = r.comparison.by_policy(reference)
    best = r.comparison.best_baseline
    if tide and best:
        lines.append(f"tide vs best baseline ({best}): {r.comparison.speedup(tide):.2f}x; "
                     + ", ".join(f"vs {b}: {r.comparison.speedup_over(reference, b):.2f}x"
                                 for b in baselines() if r.comparison.by_policy(b)))
    gap = f", gap to the Lagrangian bound {100 * plan.gap:.1f}%" if plan.gap is not None else ""
    lines.append(f"plan: {plan.mode}, tau {min(plan.tau)}..{max(plan.tau)}, budget {min(plan.budget)}.."
                 f"{max(plan.budget)} per layer ({plan_slots(plan)}), solver {plan.solver.status}{gap}")
    return lines


def write_index(out: Path, results: list[CaseResult]) -> Path:
    """index.html of the report folder: per case the table, the figures, the plan and the timeline."""
    from tidesim.html_report import Link, Report, Section, Table, timeline_link, write_report

    sections = []
    for r in results:
        tag = f"{r.model}_{r.hw}"
        names = [Path(f).name for f in r.figures]
        plan = r.plan
        sections.append(Section(
            r.label, paragraphs=case_lines(r),
            tables=[Table(TABLE_COLUMNS, table_rows(r), "policies (simulated, held-out prompts)")],
            figures=[n for n in names if n.endswith(".png")],
            links=[timeline_link(n) for n in names if n.endswith(".json")]))
        sections.append(Section(
            f"{r.label}: the per-layer plan",
            tables=[Table(["MoE layer", "tau", "budget"],
                          [[i, t, b] for i, (t, b) in enumerate(zip(plan.tau, plan.budget, strict=True))],
                          f"{plan_slots(plan)}")],
            links=[Link(f"plan_{tag}.json", f"plan_{tag}.json", "the plan file, for tidesim simulate --plan")]))
    sections.append(Section("files", links=[Link("summary.json", "summary.json", "every number above, as JSON")]))
    report = Report("tidesim demo: expert-offload policies on the bundled LLaDA2.0 traces",
                    intro=FOOTNOTES, sections=sections)
    return write_report(report, out)
