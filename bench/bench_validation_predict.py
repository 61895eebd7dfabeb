"""Recompute the predictions of a stored validation run with the current model, without measuring.

`tidesim validate` stores, per configuration, the measured step time next to the simulator's
prediction (bench/results/validation-dev-2core-cpu/results.json). A change to the layer model
changes the predictions but not the measurements; this script rebuilds every configuration's
Schedule on the same workload (the validated trace is stored beside the results, trace.parquet:
synthesized by generator version 1, which the synthesizer of issue 16 no longer reproduces),
predicts it with the simulator as validate does, and prints the step-time errors of the stored
and of the new predictions.

    .venv/bin/python bench/bench_validation_predict.py [--results DIR] [--hw FILE] [--trace FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.evaluate import evaluate
from tidesim.hardware import load_profile
from tidesim.scenario import assemble
from tidesim.trace.io import read_trace
from tidesim.workload import Workload, workload_from_trace

ROOT = Path(__file__).resolve().parents[1]


def first_layers(workload: Workload, layers: int) -> Workload:
    """The workload of the first MoE layers only, as `tidesim validate --layers` runs it (no dense
    layers, a one-row head)."""
    spec = workload.model
    sub = replace(spec, name=f"{spec.name}[{layers} of {workload.num_layers} MoE layers]", num_layers=layers,
                  first_dense_layers=0, vocab_size=1)
    return replace(workload, model=sub, expert_tokens=np.ascontiguousarray(workload.expert_tokens[:, :layers]))


def predictions(workload: Workload, hw_path: Path, rows: list[dict[str, Any]]) -> list[float]:
    """The simulator's step time (ms) of every stored configuration."""
    hw = load_profile(hw_path)
    out = []
    for r in rows:
        scenario = assemble(str(hw_path), workload, hw, [r["policy"]], budget=int(r["budget"]),
                            tau=int(r["tau"] or 1), refresh=r["refresh"], engine="sim", allow_roofline=True)
        out.append(evaluate(scenario, r["policy"]).metrics.step_time_s * 1e3)
    return out


def errors(predicted: list[float], measured: list[float]) -> list[float]:
    return [(p - m) / m for p, m in zip(predicted, measured, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "validation-dev-2core-cpu")
    ap.add_argument("--hw", type=Path, default=ROOT / "hwprofiles" / "dev-2core-cpu.yaml")
    ap.add_argument("--trace", type=Path, help="the validated trace (default: trace.parquet in --results)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    stored = json.loads((args.results / "results.json").read_text())
    setup, rows = stored["setup"], stored["rows"]
    workload = workload_from_trace(read_trace(args.trace or args.results / "trace.parquet"))
    workload = first_layers(workload.select(np.arange(int(setup["forwards"]))), int(setup["moe_layers"]))
    measured = [float(r["measured_step_ms"]) for r in rows]
    before = [float(r["predicted_step_ms"]) for r in rows]
    now = predictions(workload, args.hw, rows)
    err_before, err_now = errors(before, measured), errors(now, measured)
    table = [{"config": r["config"], "measured_ms": m, "stored_ms": b, "now_ms": n, "stored_error": eb,
              "now_error": en}
             for r, m, b, n, eb, en in zip(rows, measured, before, now, err_before, err_now, strict=True)]
    summary = {name: {"median_abs_error": statistics.median(abs(e) for e in errs),
                      "max_abs_error": max(abs(e) for e in errs)}
               for name, errs in (("stored", err_before), ("now", err_now))}
    if args.json:
        print(json.dumps({"rows": table, "summary": summary}, indent=2, sort_keys=True))
        return
    print(f"{'configuration':22s} {'measured':>9s} {'stored':>9s} {'err':>7s} {'now':>9s} {'err':>7s}")
    for t in table:
        print(f"{t['config']:22s} {t['measured_ms']:9.2f} {t['stored_ms']:9.2f} {t['stored_error']:+7.1%} "
              f"{t['now_ms']:9.2f} {t['now_error']:+7.1%}")
    for name, s in summary.items():
        print(f"{name:7s} median |error| {s['median_abs_error']:.1%}, max |error| {s['max_abs_error']:.1%}")


if __name__ == "__main__":
    main()
