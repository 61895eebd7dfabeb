"""The default refresh interval: --tau when given, else the plan's, else the analytic best; the
commands print the choice with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from planner_cases import gib_for_slots, h100, tiny_workload, write_tiny_trace

from tidesim.cli import main
from tidesim.default_tau import CANDIDATE_TAUS, best_tau, choose_tau, plan_tau
from tidesim.errors import InputError
from tidesim.plan import load_plan
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.run import run


def analytic_tide(tau: int, budget: int, refresh: str) -> float:
    """tokens/s of tide at one tau, computed by running the policy (not through the cost table)."""
    w = tiny_workload()
    options = PolicyOptions(budget=uniform(budget, w.num_layers), tau=uniform(tau, w.num_layers), hw=h100(),
                            refresh=refresh)
    return run(w, build_schedule("tide", w, options), h100(), engine="analytic").tokens_per_s


@pytest.mark.parametrize("refresh", ["sync", "async"])
def test_best_tau_is_the_argmax_of_independent_runs(refresh: str) -> None:
    choice = best_tau(tiny_workload(), h100(), 6, refresh)
    expected = {t: analytic_tide(t, 6, refresh) for t in CANDIDATE_TAUS}
    assert choice.tokens_per_s == pytest.approx(expected, rel=1e-9)
    best = max(expected.values())
    assert choice.tau == min(t for t, v in expected.items() if v >= best * (1 - 1e-12))
    assert choice.source == "analytic"
    assert choice.line.startswith(f"tau {choice.tau}: best single tau for this trace and profile (analytic model")
    assert f"{refresh} refresh" in choice.line


def test_given_tau_wins_and_is_checked() -> None:
    assert choose_tau(tiny_workload(), h100(), 6, given=5).line == "tau 5: given with --tau"
    with pytest.raises(InputError, match="at least 1"):
        choose_tau(tiny_workload(), h100(), 6, given=0)


def test_plan_tau_is_the_plans_best_single_tau(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_tiny_trace(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["plan", "--trace", str(trace), "--hw", "h100-sxm-pcie5", "--gpu-mem-gib", str(gib_for_slots(24)),
                 "--taus", "1..6", "--budgets", "2,4,8,12", "-o", str(out)]) == 0
    plan = load_plan(out)
    assert plan.heldout is not None and plan.heldout.prompts == [1, 2]
    choice = plan_tau(plan)
    # the best single tau where the plan was evaluated (the held-out prompts), not where it was fit
    assert choice.tau == plan.heldout.best_single_tau and choice.source == "plan"
    assert choose_tau(tiny_workload(), h100(), 6, plan=plan) == choice
    capsys.readouterr()
    # compare with the plan runs tide at the plan's tau and says so
    assert main(["compare", "--trace", str(trace), "--hw", "h100-sxm-pcie5", "--plan", str(out), "--budget", "6",
                 "--engine", "analytic", "--policies", "tide,planned"]) == 0
    text = capsys.readouterr().out
    assert f"tau {choice.tau}: the plan's best single tau (held-out prompts 1,2, analytic model)" in text


def test_simulate_and_compare_print_the_same_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = str(write_tiny_trace(tmp_path))
    expected = best_tau(tiny_workload(), h100(), 6, "sync")
    base = ["--trace", trace, "--hw", "h100-sxm-pcie5", "--budget", "6", "--engine", "analytic"]
    assert main(["simulate", *base, "--policy", "tide"]) == 0
    assert expected.line in capsys.readouterr().out
    assert main(["compare", *base, "--policies", "tide,cpu-routing"]) == 0
    assert expected.line in capsys.readouterr().out
    assert main(["compare", *base, "--policies", "tide", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["tau"] == expected.tau and data["inputs"]["tau_choice"]["reason"] == expected.reason
    # a policy that does not use tau gets no tau line
    assert main(["simulate", *base, "--policy", "cpu-routing"]) == 0
    assert "tau " not in capsys.readouterr().out.splitlines()[1]


def test_long_work_is_announced_on_stderr_when_not_a_terminal(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    trace = str(write_tiny_trace(tmp_path))
    assert main(["simulate", "--trace", trace, "--hw", "h100-sxm-pcie5", "--policy", "tide", "--tau", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("tidesim simulate: tide on ") and "forwards (sim)" in err[0]
    assert err[1].startswith("tidesim simulate: done in ") and err[1].endswith("tokens/s")
