"""`tidesim plan`: writes a valid plan, --json, exit 2 with one line and no file on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from planner_cases import gib_for_slots, write_tiny_trace

from tidesim.cli import main
from tidesim.plan import load_plan
from tidesim.planner import plan_policies
from tidesim.policies.registry import plan_runner


def plan_args(trace: Path, out: Path, *extra: str, gib: float | None = None) -> list[str]:
    return ["plan", "--trace", str(trace), "--hw", "h100-sxm-pcie5", "--gpu-mem-gib", str(gib or gib_for_slots(24)),
            "--taus", "1..6", "--budgets", "2,4,8,12", "-o", str(out), *extra]


def test_table_output_and_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(plan_args(trace, out, "--calibrate-prompts", "0,1")) == 0
    text = capsys.readouterr().out
    assert "solver: optimal" in text and "held-out" in text and "moe layer" in text and "gap" in text
    plan = load_plan(out)
    assert plan.mode == "per-layer" and plan.expert_slots == 24 and sum(plan.budget) <= 24
    assert plan.heldout is not None and plan.heldout.prompts == [2]


def test_json_and_global_tau(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(plan_args(trace, out, "--global-tau", "--time-limit", "30", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["mode"] == "global-tau" and len(set(data["plan"]["tau"])) == 1
    assert data["plan"]["solver"]["time_limit_s"] == 30 and data["plan"]["solver"]["status"] == "optimal"
    assert [row["tau"] for row in data["tau_sweep"]] == list(range(1, 7))
    assert load_plan(out).to_dict() == data["plan"]


@pytest.mark.parametrize("extra, gib, message", [
    ((), 1.3, "does not hold"),
    (("--taus", "0..3"), None, "--taus must be at least 1"),
    (("--budgets", "4,99"), None, "must not exceed"),
    (("--time-limit", "0"), None, "--time-limit must be positive"),
    (("--calibrate-prompts", "9"), None, "prompt 9 is not in the trace"),
])
def test_bad_input_exit_2_and_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...],
                                      gib: float | None, message: str) -> None:
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(plan_args(trace, out, *extra, gib=gib)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.parquet"]


def test_missing_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(plan_args(tmp_path / "none.parquet", tmp_path / "p.json")) == 2
    assert "none.parquet" in capsys.readouterr().err


def test_simulate_runs_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(plan_args(trace, out, "--calibrate-prompts", "0,1", "--json")) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    sim = ["simulate", "--trace", str(trace), "--hw", "h100-sxm-pcie5", "--plan", str(out), "--engine", "analytic",
           "--prompts", "0,1", "--json"]
    assert main(sim) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["policy"] == "planned"
    # The executor's time of the plan on its calibration prompts is the planner's objective.
    assert result["metrics"]["total_time_s"] == pytest.approx(plan["objective_s"], rel=1e-9)
    assert main([*sim[:-1], "--policy", "tide"]) == 2
    assert "--plan runs the policy planned (the plan is for tide)" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(trace), "--hw", "h100-sxm-pcie5", "--policy", "planned"]) == 2
    assert "--plan FILE" in capsys.readouterr().err


def test_simulate_refuses_a_plan_for_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(plan_args(trace, out)) == 0
    capsys.readouterr()
    assert main(["simulate", "--trace", "llada2-mini_prefix_g1024", "--hw", "h100-sxm-pcie5", "--plan", str(out),
                 "--engine", "analytic"]) == 2
    assert "made for model 'tiny'" in capsys.readouterr().err


def test_plan_and_simulate_state_the_same_slot_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`plan` and `simulate --plan` name the slots the budgets use and the slots the memory holds alike,
    and the planner's Lagrangian bound is not called an oracle (that is a policy)."""
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(plan_args(trace, out)) == 0
    captured = capsys.readouterr()
    planned = captured.out
    # not a terminal: one line when the work starts, one with a summary when it ends
    err = captured.err.splitlines()
    assert len(err) == 2 and err[0].startswith("tidesim plan: cost table, MILP and Lagrangian bound")
    assert err[1].startswith("tidesim plan: done in ") and "expert slots" in err[1]
    plan = load_plan(out)
    slots = f"{sum(plan.budget)} of 24 expert slots"
    assert slots in planned and "Lagrangian lower bound" in planned and "oracle lower bound" not in planned
    assert main(["simulate", "--trace", str(trace), "--hw", "h100-sxm-pcie5", "--plan", str(out)]) == 0
    assert slots in capsys.readouterr().out
    assert main(["simulate", "--trace", str(trace), "--hw", "h100-sxm-pcie5", "--plan", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"]["expert_slots"] == slots


@pytest.mark.parametrize("policy", plan_policies())
def test_policy_option_plans_for_that_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str) -> None:
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(plan_args(trace, out, "--policy", policy, "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    plan = load_plan(out)
    assert plan.policy == policy and data["plan"]["policy"] == policy
    assert plan.selection is not None and plan.selection.chosen in {c.name for c in plan.selection.candidates}
    assert main(plan_args(trace, tmp_path / "other.json", "--policy", "fiddler")) == 2
    assert "invalid choice: 'fiddler'" in capsys.readouterr().err


def test_a_tide_split_plan_runs_as_tide_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # simulate --plan runs the plan's policy with the plan: the time the plan file recorded for
    # its held-out prompts (same executor); compare runs it in tide-split's row, not as planned.
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(plan_args(trace, out, "--policy", "tide-split")) == 0
    assert "Lagrangian lower bound: none for tide-split" in capsys.readouterr().out
    plan = load_plan(out)
    assert plan_runner(plan.policy) == "tide-split" and plan.oracle_bound_s is None and plan.heldout is not None
    held = ",".join(map(str, plan.heldout.prompts))
    base = ["--trace", str(trace), "--hw", "h100-sxm-pcie5", "--plan", str(out), "--prompts", held,
            "--engine", "analytic", "--json"]
    assert main(["simulate", *base]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["policy"] == "tide-split"
    assert metrics["total_time_s"] == pytest.approx(plan.heldout.plan_time_s, rel=1e-12)
    assert main(["simulate", *base, "--policy", "tide"]) == 2
    assert "--plan runs the policy tide-split" in capsys.readouterr().err
    assert main(["compare", *base, "--policies", "tide-split,tide"]) == 0
    rows = {m["policy"]: m for m in json.loads(capsys.readouterr().out)["policies"]}
    assert rows["tide-split"]["total_time_s"] == pytest.approx(plan.heldout.plan_time_s, rel=1e-12)


def test_measured_profile_without_the_model_curve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """plan applies the scenario's measured-curves check (scenario.check_curves): refused with one
    line naming the missing curve, planned on rooflines with --allow-roofline."""
    from simkit import profile

    trace = write_tiny_trace(tmp_path)
    prof = profile()
    prof.gpu.mem_bandwidth_gbs = prof.gpu.bf16_tflops = 1e5     # inside the plausible ranges
    prof.pcie.h2d_gbs = prof.pcie.d2h_gbs = 0.01
    prof.gpu.expert_ffn = []
    hw = tmp_path / "no_gpu_curve.yaml"
    prof.save(hw)
    out = tmp_path / "plan.json"
    args = ["plan", "--trace", str(trace), "--hw", str(hw), "--gpu-mem-gib", str(gib_for_slots(24)),
            "--taus", "1,2", "--budgets", "2,4", "--oracle-iterations", "1", "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no gpu.expert_ffn curve for 128x64" in err and not out.exists()
    assert main([*args, "--allow-roofline"]) == 0 and load_plan(out).hw == "round"
