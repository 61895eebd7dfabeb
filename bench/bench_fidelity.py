"""Fidelity of the simulator on this machine (cpu-as-gpu): calibrate, then validate full-swap,
cpu-routing, fiddler and tide (sync and async) at two budgets on both KV-cache modes and on a
window after the first block, and report the step-time errors of all configurations together.

One command (docs/validation.md records its results with the date and the machine's load):

    .venv/bin/python bench/bench_fidelity.py --out bench/results/fidelity-dev-2core-cpu

Steps, each a `tidesim` command printed before it runs: `trace synth` of the none-cache trace
(the prefix trace is the stored one of the earlier validation, bench/results/validation-dev-2core-cpu/
trace.parquet, and the none trace is synthesized with the same settings); then for each of the
three validations (prefix, none, prefix after its first block) a `calibrate` (full, not --quick)
into OUT/profile_<run>.yaml right before its `validate` (one process each, every configuration
measured --repeats times, median kept): on a machine whose speed drifts (the 2-core VM slowed by
15% within one run) a profile measured minutes before its validation describes it better than one
measured before all three (--calibrate-once: one OUT/profile.yaml for all, as before). OUT gets
each validation's folder, the profiles and fidelity.json (every configuration's row and the
median and max |error| over all of them, and each repeat pass's median signed error in the
order the passes ran: a shift between passes is the machine's speed moving during the
measurement, which no profile measured once can follow); a table prints last.

--repredict re-predicts a finished run's configurations from its stored measurements and a
profile (default each run's OUT/profile_<run>.yaml, else OUT/profile.yaml), without running
anything on the runtime: the same
schedules (the policies are deterministic), the simulator again. With --copy-scale F (every
copy F times the profile's) and --copy-slows S (pcie.copy_slows_compute = S) it answers "what
would the errors have been with these terms", the offline check of a model or calibration
change (docs/validation.md); --fixed-scale F (attention grid, layer_overhead_us and any measured gpu.layer_fixed grid F
times) and
--contention S (cpu.gpu_contention = S), --pool-contention S (cpu.pool_contention = S) and
--copy-slows-cpu S (pcie.copy_slows_cpu = S) likewise:

    .venv/bin/python bench/bench_fidelity.py --out bench/results/fidelity-dev-2core-cpu --repredict --copy-scale 1.99
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.curves import layer_fixed_grid
from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile, load_profile, profile_from_dict
from tidesim.models import PRESETS, ModelSpec
from tidesim.policies.registry import traits

REPO = Path(__file__).resolve().parents[1]
PREFIX_TRACE = REPO / "bench/results/validation-dev-2core-cpu/trace.parquet"
SYNTH_NONE = ["trace", "synth", "--model", "llada2-mini", "--prompts", "1", "--gen-length", "96",
              "--prompt-length", "64", "--block-length", "32", "--kv-cache", "none"]
GRID = ["--layers", "1", "--forwards", "24", "--budgets", "32,96", "--taus", "4",
        "--policies", "full-swap,cpu-routing,fiddler,tide", "--refresh", "sync,async", "--device", "cpu"]


def tidesim(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "tidesim", *args]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


RUNS: tuple[tuple[str, Path, list[str]], ...] = (("prefix", PREFIX_TRACE, []), ("none", Path("trace_none.parquet"), []),
        ("window", PREFIX_TRACE, ["--window", "after-first-block"]))


def transferred_layer_fixed(hw: HardwareProfile, other: HardwareProfile, spec: ModelSpec) -> list[dict[str, Any]]:
    """`other`'s measured gpu.layer_fixed grid for spec's layer shape, brought to `hw`'s machine:
    each cell (tokens, context) times hw's attention time over other's there (calibrate times the
    attention and the fixed path interleaved, so other's ratio of the two is that of one machine
    state). What hw's calibration would have measured had it timed the fixed path, to the extent
    the machine's speed moves the attention and the rest of the path alike: an estimate for
    re-predicting runs calibrated before gpu.layer_fixed existed, not a measurement."""
    g = layer_fixed_grid(other.gpu, spec)
    if g is None:
        raise SystemExit(f"--layer-fixed-from: {other.name} has no gpu.layer_fixed grid of {spec.name}'s layer shape")
    t, c = np.meshgrid(np.asarray(g["tokens"], float), np.asarray(g["context"], float), indexing="ij")
    ratio = hw.attention_time(t, c, spec) / other.attention_time(t, c, spec)
    return [{**g, "time_us": (np.asarray(g["time_us"], float) * ratio).tolist()}]


def what_if(hw: HardwareProfile, copy_scale: float = 1.0, copy_slows: float | None = None,
            fixed_scale: float = 1.0, contention: float | None = None,
            layer_fixed: list[dict[str, Any]] | None = None, pool_contention: float | None = None,
            copy_slows_cpu: float | None = None) -> HardwareProfile:
    """The profile with every copy copy_scale times as long (curves and bandwidths), the GPU's
    fixed per-layer work (the attention grid, layer_overhead_us and the measured fixed-path grids)
    fixed_scale times, and, if given, pcie.copy_slows_compute, cpu.gpu_contention,
    cpu.pool_contention, pcie.copy_slows_cpu and gpu.layer_fixed replaced."""
    data = (hw.scaled(pcie=1.0 / copy_scale) if copy_scale != 1.0 else hw).to_dict()
    if layer_fixed is not None:
        data["gpu"]["layer_fixed"] = layer_fixed
    if copy_slows is not None:
        data["pcie"]["copy_slows_compute"] = copy_slows
    if contention is not None:
        data["cpu"]["gpu_contention"] = contention
    if pool_contention is not None:
        data["cpu"]["pool_contention"] = pool_contention
    if copy_slows_cpu is not None:
        data["pcie"]["copy_slows_cpu"] = copy_slows_cpu
    if fixed_scale != 1.0:
        data["gpu"]["layer_overhead_us"] *= fixed_scale
        for grid in (*data["gpu"]["attention"], *data["gpu"].get("layer_fixed", [])):
            grid["time_us"] = [[t * fixed_scale for t in row] for row in grid["time_us"]]
    return profile_from_dict(data, source=hw.name, plausible=False)


def mean_profile(before: HardwareProfile, after: HardwareProfile) -> HardwareProfile:
    """The two calibrations that bracket a validation, averaged: every measured number the mean
    of the two (curves and grids point by point), names and provenance the first's. Both must be
    calibrations of one machine with one grid (same counts, points and shapes), else SystemExit."""
    def mean(a: Any, b: Any, where: str) -> Any:
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            return {k: a[k] if k in ("provenance", "name", "description") else mean(a[k], b[k], f"{where}.{k}")
                    for k in a}
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return [mean(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))]
        if isinstance(a, bool) or isinstance(a, int) and isinstance(b, int) or a is None or isinstance(a, str):
            if a != b:
                raise SystemExit(f"--bracket: the two calibrations differ at {where} ({a!r} vs {b!r})")
            return a
        if isinstance(a, float | int) and isinstance(b, float | int):
            return (float(a) + float(b)) / 2
        raise SystemExit(f"--bracket: the two calibrations differ in form at {where}")
    return profile_from_dict(mean(before.to_dict(), after.to_dict(), "profile"), source=before.name)


def profile_path(out: Path, name: str) -> Path:
    """The profile a run's validation used: OUT/profile_<run>.yaml (one calibration per run),
    else OUT/profile.yaml (one calibration for all, --calibrate-once and runs before it)."""
    own = out / f"profile_{name}.yaml"
    return own if own.exists() else out / "profile.yaml"


def repredict(out: Path, hw: HardwareProfile | dict[str, HardwareProfile | None]) -> list[dict[str, Any]]:
    """Every stored configuration of OUT's validations, predicted again with `hw` (one profile, or
    one per run name; a run named with None is left out): the rows of fidelity.json with
    predicted_step_ms and error recomputed (measured values as stored)."""
    from tidesim_runtime.engine.executor import first_layers
    from tidesim_runtime.measure.validate import Config, build, window

    from tidesim.run import run
    from tidesim.trace import read_trace
    from tidesim.workload import workload_from_trace

    layers, forwards = int(GRID[GRID.index("--layers") + 1]), int(GRID[GRID.index("--forwards") + 1])
    rows: list[dict[str, Any]] = []
    for name, trace, extra in RUNS:
        run_hw = hw[name] if isinstance(hw, dict) else hw
        if run_hw is None:
            continue
        workload = window(workload_from_trace(read_trace(trace_path(out, trace))), forwards,
                          "after-first-block" in extra)
        workload = first_layers(workload, layers)
        stored = configuration_rows(out / f"validate_{name}")
        steps, speeds = repeat_steps(stored), repeat_speeds(stored)
        for c in json.loads((out / f"validate_{name}" / "results.json").read_text())["rows"]:
            config = Config(c["policy"], c["budget"], c["tau"], c["refresh"])
            predicted = run(workload, build(config, workload, run_hw, None), run_hw, engine="sim")
            p_ms, m_ms = predicted.step_time_s * 1e3, c["measured_step_ms"]
            rows.append({**c, "run": name, "predicted_step_ms": p_ms, "error": (p_ms - m_ms) / m_ms,
                         "abs_error": abs(p_ms - m_ms) / m_ms, "stored_error": c["error"],
                         "repeat_errors": repeat_errors(p_ms, steps.get(c["config"], [])),
                         "repeat_speeds": speeds.get(c["config"], [])})
    return rows


def configuration_rows(folder: Path) -> list[dict[str, Any]]:
    """A validation's configurations.jsonl (one row per configuration, written as each finished);
    empty where the run has none."""
    path = folder / "configurations.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def repeat_steps(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Every configuration's measured step time (s) of each repeat, in the order they ran
    (validate interleaves the repeats over the configurations: repeat r of every configuration
    runs before repeat r + 1 of any)."""
    return {r["config"]: [float(s) for s in r.get("measured_step_s", [])] for r in rows}


def repeat_speeds(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Every configuration's speed probe of each repeat over what the profile says it takes
    (validate's SpeedProbe, right before the repeat): 1.10 is a machine 10% slower than when it
    was calibrated. Empty for runs recorded before the probe existed."""
    return {r["config"]: [float(p) / float(r["probe_expected_s"]) for p in r.get("probe_s", [])]
            for r in rows if float(r.get("probe_expected_s", 0.0)) > 0}


def speed_matched(rows: list[dict[str, Any]]) -> list[float]:
    """|error| of every configuration with each repeat's prediction scaled by that repeat's speed
    probe (median over repeats): what is left of the error once the machine's speed change since
    calibrate, as the probe measures it, is taken out. A diagnostic beside the plain errors, not a
    replacement: it assumes every resource moved with the probed path."""
    out = []
    for r in rows:
        pairs = list(zip(r["repeat_errors"], r.get("repeat_speeds", []), strict=False))
        if not pairs or len(pairs) != len(r["repeat_errors"]):
            continue
        # error e = p / m - 1 with p the prediction; the speed-matched one is p x v / m - 1
        out.append(abs(statistics.median((1 + e) * v - 1 for e, v in pairs)))
    return out


def repeat_errors(predicted_ms: float, steps: list[float]) -> list[float]:
    """The signed error of a prediction against each repeat's measured step time (s)."""
    return [(predicted_ms - 1e3 * s) / (1e3 * s) for s in steps]


def trace_path(out: Path, trace: Path) -> Path:
    """A run's trace: RUNS names the none trace relative to OUT, the prefix trace absolutely."""
    return trace if trace.is_absolute() else out / trace


def pass_shift(passes: list[tuple[str, int, float, int]]) -> float:
    """The largest minus the smallest median signed error of the repeat passes (drift): how far
    the machine's speed moved during the measurement. A shift above STEADY means the median
    |error| over all configurations measures the machine as much as the model."""
    return max(e for _, _, e, _ in passes) - min(e for _, _, e, _ in passes) if passes else 0.0


STEADY = 0.05


def group_errors(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """(median |error|, max |error|, configurations) per policy (an interval policy by refresh
    mode), per run and per budget: where the errors sit."""
    groups: list[dict[str, list[float]]] = [{}, {}, {}]
    for r in rows:
        policy = r["policy"] + (f" {r['refresh']}" if traits(r["policy"]).uses_tau else "")
        for group, key in zip(groups, (policy, f"run {r['run']}", f"B={r['budget']}"), strict=True):
            group.setdefault(key, []).append(r["abs_error"])
    return {k: (statistics.median(v), max(v), len(v)) for g in groups for k, v in sorted(g.items())}


def group_records(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """group_errors as fidelity.json stores them."""
    return {k: {"median_abs_error": a, "max_abs_error": b, "configurations": c}
            for k, (a, b, c) in group_errors(rows).items()}


def report_groups(rows: list[dict[str, Any]]) -> None:
    print("by group (median / max |error|, configurations): " + "; ".join(
        f"{k} {m:.1%} / {x:.1%} ({n})" for k, (m, x, n) in group_errors(rows).items()))


def pass_speeds(rows: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """(run, repeat, median speed probe / profile over the pass's configurations) per pass, in the
    order they ran; empty without probes."""
    out = []
    for name, _, _ in RUNS:
        mine = [r["repeat_speeds"] for r in rows if r["run"] == name and r.get("repeat_speeds")]
        for k in range(max((len(v) for v in mine), default=0)):
            out.append((name, k, statistics.median(v[k] for v in mine if len(v) > k)))
    return out


def report_passes(passes: list[tuple[str, int, float, int]], rows: list[dict[str, Any]] | None = None) -> None:
    if not passes:
        return
    shift = pass_shift(passes)
    print("repeat passes in the order they ran (median signed error of the pass's configurations):")
    print("  " + "; ".join(f"{n} #{k + 1} {e:+.1%}" for n, k, e, _ in passes))
    speeds = pass_speeds(rows or [])
    if speeds:
        print("speed probe / profile per pass (1.10: the machine 10% slower than at calibrate):")
        print("  " + "; ".join(f"{n} #{k + 1} {v:.3f}" for n, k, v in speeds))
        matched = speed_matched(rows or [])
        if matched:
            print(f"with each repeat's prediction scaled by its probe (a diagnostic, not the result): median |error| "
                  f"{statistics.median(matched):.1%}, max {max(matched):.1%}")
    if shift > STEADY:
        print(f"the passes differ by {shift:.1%} (more than {STEADY:.0%}): the machine's speed changed during the "
              "measurement; the median |error| above measures it as much as the model")


def drift(rows: list[dict[str, Any]]) -> list[tuple[str, int, float, int]]:
    """(run, repeat, median signed error over the run's configurations, configurations) per
    repeat pass, in the order the passes ran: a machine whose speed changed during the
    measurement shows as a shift shared by every configuration of a pass, which no profile
    (measured once, at calibrate) can follow."""
    out: list[tuple[str, int, float, int]] = []
    for name, _, _ in RUNS:
        mine = [r for r in rows if r["run"] == name]
        for k in range(max((len(r["repeat_errors"]) for r in mine), default=0)):
            errs = [r["repeat_errors"][k] for r in mine if len(r["repeat_errors"]) > k]
            out.append((name, k, statistics.median(errs), len(errs)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--repeats", type=int, default=3, help="repeats per configuration (3)")
    p.add_argument("--hw", default=None, help="use this profile instead of calibrating")
    p.add_argument("--bracket", action="store_true",
                   help="also calibrate right after each validation and report the errors predicted with the "
                        "mean of the two calibrations (OUT/profile_<run>_after.yaml, _bracket.yaml) beside the plain "
                        "ones; with --repredict, re-predict with the stored bracket profiles")
    p.add_argument("--calibrate-once", action="store_true",
                   help="one calibration (OUT/profile.yaml) for all three validations, not one right before each")
    p.add_argument("--repredict", action="store_true",
                   help="only predict OUT's stored validations again (with --hw, default each run's profile)")
    p.add_argument("--copy-scale", type=float, default=1.0, help="with --repredict: copies this many times longer")
    p.add_argument("--copy-slows", type=float, default=None, help="with --repredict: pcie.copy_slows_compute")
    p.add_argument("--fixed-scale", type=float, default=1.0,
                   help="with --repredict: the GPU's fixed per-layer work (attention, layer overhead) this many times")
    p.add_argument("--contention", type=float, default=None, help="with --repredict: cpu.gpu_contention")
    p.add_argument("--pool-contention", type=float, default=None, help="with --repredict: cpu.pool_contention")
    p.add_argument("--copy-slows-cpu", type=float, default=None, help="with --repredict: pcie.copy_slows_cpu")
    p.add_argument("--layer-fixed-from", default=None, metavar="PROFILE",
                   help="with --repredict: PROFILE's measured gpu.layer_fixed grid, each cell scaled by the two "
                        "profiles' attention ratio there (an estimate for runs calibrated without one)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.repredict:
        if (args.copy_scale <= 0 or args.fixed_scale <= 0 or (args.copy_slows is not None and args.copy_slows < 0)
                or any(v is not None and not 0 <= v <= 10
                       for v in (args.contention, args.pool_contention, args.copy_slows_cpu))):
            p.error("--copy-scale and --fixed-scale must be > 0, --copy-slows >= 0, --contention, "
                    "--pool-contention and --copy-slows-cpu in 0..10")
        profiles = {}
        try:
            donor = load_profile(args.layer_fixed_from) if args.layer_fixed_from else None
            for name, _, _ in RUNS:
                base = load_profile(args.hw or (out / f"profile_{name}_bracket.yaml" if args.bracket
                                                else profile_path(out, name)))
                grids = None if donor is None else transferred_layer_fixed(base, donor, PRESETS["llada2-mini"])
                profiles[name] = what_if(base, args.copy_scale, args.copy_slows, args.fixed_scale, args.contention,
                                         grids, args.pool_contention, args.copy_slows_cpu)
        except InputError as exc:
            p.error(f"--repredict: {exc} (is --out a finished run's folder?)")
        again = repredict(out, profiles)
        errs = [r["abs_error"] for r in again]
        print(f"{'run':7} {'configuration':24} {'predicted ms':>12} {'measured ms':>12} {'error':>8} {'stored':>8}")
        for r in again:
            print(f"{r['run']:7} {r['config']:24} {r['predicted_step_ms']:12.2f} {r['measured_step_ms']:12.2f} "
                  f"{r['error']:+8.1%} {r['stored_error']:+8.1%}")
        slows = "/".join(dict.fromkeys(f"{h.pcie.copy_slows_compute:g}" for h in profiles.values()))
        contention = "/".join(dict.fromkeys(f"{h.cpu.gpu_contention:g}/pool {h.cpu.pool_contention}"
                                            for h in profiles.values()))
        print(f"{len(again)} configurations re-predicted (copy scale {args.copy_scale:g}, copy_slows_compute "
              f"{slows}, fixed scale {args.fixed_scale:g}, gpu_contention "
              f"{contention}): median |error| {statistics.median(errs):.1%}, max {max(errs):.1%}")
        report_groups(again)
        report_passes(drift(again), again)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    conditions: dict[str, Any] = {"start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "load_average_start": load_average(), "command": " ".join(sys.argv)}
    none_trace = out / "trace_none.parquet"
    if not none_trace.exists():
        tidesim([*SYNTH_NONE, "-o", str(none_trace)])
    if args.bracket and (args.hw or args.calibrate_once):
        p.error("--bracket calibrates around each validation: give it without --hw and --calibrate-once")
    rows: list[dict[str, Any]] = []
    brackets: dict[str, HardwareProfile | None] = {}
    for i, (name, trace, extra) in enumerate(RUNS):
        own = "profile.yaml" if args.calibrate_once else f"profile_{name}.yaml"
        profile = Path(args.hw) if args.hw else out / own
        if not args.hw and (i == 0 or not args.calibrate_once):
            tidesim(["calibrate", "--models", "llada2-mini", "--device", "cpu", "-o", str(profile)])
        trace = trace_path(out, trace)
        # relative to the checkout (the commands run there): no stored result names where it lay
        trace = trace.relative_to(REPO) if trace.is_relative_to(REPO) else trace
        folder = out / f"validate_{name}"
        tidesim(["validate", "--trace", str(trace), "--hw", str(profile), *GRID, "--repeats", str(args.repeats),
                 *extra, "-o", str(folder)])
        if args.bracket:
            after = out / f"profile_{name}_after.yaml"
            tidesim(["calibrate", "--models", "llada2-mini", "--device", "cpu", "-o", str(after)])
            brackets[name] = mean_profile(load_profile(profile), load_profile(after))
            brackets[name].save(out / f"profile_{name}_bracket.yaml")
        data = json.loads((folder / "results.json").read_text())
        stored = configuration_rows(folder)
        steps, speeds = repeat_steps(stored), repeat_speeds(stored)
        rows += [{"run": name, **r, "profile": profile.name,
                  "repeat_errors": repeat_errors(r["predicted_step_ms"], steps.get(r["config"], [])),
                  "repeat_speeds": speeds.get(r["config"], [])}
                 for r in data["rows"]]
    errs = [abs(r["error"]) for r in rows]
    passes = drift(rows)
    conditions |= {"end_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "load_average_end": load_average(), "seconds": round(time.time() - t0, 1)}
    result = {"conditions": conditions, "configurations": len(rows), "median_abs_error": statistics.median(errs),
              "passes": [{"run": n, "repeat": k + 1, "median_error": e, "configurations": c} for n, k, e, c in passes],
              "pass_shift": pass_shift(passes),
              "pass_speeds": [{"run": n, "repeat": k + 1, "probe_over_profile": v} for n, k, v in pass_speeds(rows)],
              "speed_matched": ({"median_abs_error": statistics.median(m), "max_abs_error": max(m)}
                                if (m := speed_matched(rows)) else None),
              "groups": group_records(rows),
              "max_abs_error": max(errs), "rows": rows}
    if brackets:
        bracketed = repredict(out, brackets)
        b_errs = [r["abs_error"] for r in bracketed]
        result["bracketed"] = {"median_abs_error": statistics.median(b_errs), "max_abs_error": max(b_errs),
                               "groups": group_records(bracketed),
                               "rows": [{k: r[k] for k in ("run", "config", "predicted_step_ms", "measured_step_ms",
                                                           "error")} for r in bracketed]}
    tmp = out / ".fidelity.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / "fidelity.json")
    print(f"{'run':7} {'configuration':24} {'predicted ms':>12} {'measured ms':>12} {'error':>8}")
    for r in rows:
        print(f"{r['run']:7} {r['config']:24} {r['predicted_step_ms']:12.2f} {r['measured_step_ms']:12.2f} "
              f"{r['error']:+8.1%}")
    print(f"{len(rows)} configurations: median |error| {result['median_abs_error']:.1%}, max "
          f"{result['max_abs_error']:.1%}; load average {conditions['load_average_start']} at the start, "
          f"{conditions['load_average_end']} at the end; {conditions['seconds']} s")
    report_groups(rows)
    report_passes(passes, rows)
    if brackets:
        b = result["bracketed"]
        print(f"predicted with the mean of the calibrations before and after each validation (--bracket): "
              f"median |error| {b['median_abs_error']:.1%}, max {b['max_abs_error']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
