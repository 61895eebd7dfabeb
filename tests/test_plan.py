"""The plan file: round trip, fingerprints, validation of hand-edited files, model check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tidesim.errors import InputError
from tidesim.hardware import get_profile
from tidesim.models import PRESETS
from tidesim.plan import (
    CandidateTime,
    Evaluation,
    Fingerprints,
    Plan,
    Selection,
    SolverInfo,
    file_fingerprint,
    load_plan,
    model_fingerprint,
    profile_fingerprint,
    sha256_bytes,
)

MINI = PRESETS["llada2-mini"]
TRACE_SHA, PROFILE_SHA = sha256_bytes(b"trace"), sha256_bytes(b"profile")


def make_plan(**changes: object) -> Plan:
    layers = MINI.num_moe_layers
    values: dict[str, object] = dict(
        model="llada2-mini", hw="h100-sxm-pcie5", trace="t.parquet", mode="per-layer", gpu_mem_gib=20.0,
        expert_slots=2432, tau=[2] * layers, budget=[128] * layers, objective_s=1.5, oracle_bound_s=1.2,
        gap=0.25, solver=SolverInfo("cbc", "optimal", True, 0.01, None, 1.5),
        fingerprints=Fingerprints(TRACE_SHA, PROFILE_SHA, model_fingerprint(MINI)), taus=[1, 2], budgets=[64, 128],
        heldout=Evaluation([2, 3], "analytic", 100, 1.0, 100.0, 2, 128, 1.1, 90.9, 1.1),
    )
    values.update(changes)
    return Plan(**values)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    plan = make_plan(policy="tide-split", selection=Selection(
        [2, 3], "sim", "optimum", [CandidateTime("tau 2", 1.2), CandidateTime("optimum", 1.0)]))
    path = tmp_path / "plan.json"
    plan.save(path)
    again = load_plan(path)
    assert again == plan
    assert again.tau_array().tolist() == [2] * 19 and again.budget_array().sum() == 128 * 19
    assert path.read_text() == again.to_json()


def test_fingerprints(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert file_fingerprint(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert model_fingerprint(MINI) != model_fingerprint(PRESETS["llada2-flash"])
    h100 = get_profile("h100-sxm-pcie5")
    assert profile_fingerprint(h100) == profile_fingerprint(get_profile("h100-sxm-pcie5"))
    assert profile_fingerprint(h100) != profile_fingerprint(h100.scaled(pcie=2.0))


@pytest.mark.parametrize("change, message", [
    ({"tau": [0] * 19}, "tau must be an integer >= 1"),
    ({"budget": [128] * 18}, "one value per MoE layer"),
    ({"budget": [200] * 19}, "more than the 2432"),
    ({"mode": "global-tau", "tau": [1] * 18 + [2]}, "one tau for every layer"),
    ({"mode": "weird"}, "mode must be"),
    ({"version": 7}, "version 7"),
    ({"policy": ""}, "policy must name"),
    ({"selection": {"prompts": [2], "engine": "sim", "chosen": "tau 9",
                    "candidates": [{"name": "tau 2", "time_s": 1.0}]}}, "'tau 9' is not among its candidates"),
    ({"selection": {"prompts": [2], "engine": "sim", "chosen": "tau 2", "candidates": "tau 2"}},
     "candidates: expected a list"),
    ({"selection": {"prompts": [2], "engine": "sim", "chosen": "tau 2", "candidates": [{"name": "tau 2"}]}},
     "'time_s' is missing"),
])
def test_invalid_plans_are_refused(change: dict[str, object], message: str, tmp_path: Path) -> None:
    data = make_plan().to_dict()
    data.update(change)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        load_plan(path)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such plan"):
        load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_plan(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match="not a tidesim plan"):
        load_plan(bad)
    data = make_plan().to_dict()
    del data["solver"]["status"]
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError, match="'status' is missing"):
        load_plan(bad)
    data = make_plan().to_dict()
    data["surprise"] = 1
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError, match="unknown field 'surprise'"):
        load_plan(bad)


def test_invalid_plan_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    with pytest.raises(InputError):
        make_plan(tau=[0] * 19).save(path)
    assert list(tmp_path.iterdir()) == []


def test_model_check() -> None:
    plan = make_plan()
    plan.check_model(MINI)
    with pytest.raises(InputError, match="made for model 'llada2-mini'"):
        plan.check_model(PRESETS["llada2-flash"])


def test_memory_bytes() -> None:
    assert make_plan().memory_bytes(MINI) == 128 * 19 * MINI.expert_bytes + MINI.non_expert_bytes


@pytest.mark.parametrize("name", ["trace_sha256", "profile_sha256", "model_sha256"])
def test_placeholder_fingerprints_refused(tmp_path: Path, name: str) -> None:
    data = make_plan().to_dict()
    data["fingerprints"][name] = "0" * 64
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"fingerprints.{name} is a placeholder"):
        load_plan(path)


def test_model_message_names_what_differs() -> None:
    plan = make_plan()
    wider = PRESETS["llada2-mini"].to_dict() | {"hidden_size": 1024}
    from tidesim.models import ModelSpec
    with pytest.raises(InputError) as err:
        plan.check_model(ModelSpec.from_dict(wider))
    message = str(err.value)
    assert "hidden_size is 1024 (the plan's: 2048)" in message
    assert message.count("llada2-mini") == 1


def test_plan_on_other_inputs_refused_or_warned(tmp_path: Path) -> None:
    trace = tmp_path / "t.bin"
    trace.write_bytes(b"trace")                  # the plan's trace fingerprint is sha256(b"trace")
    other = tmp_path / "u.bin"
    other.write_bytes(b"another trace")
    plan = make_plan()
    hw = get_profile("h100-sxm-pcie5")
    plan.fingerprints.profile_sha256 = profile_fingerprint(hw)
    assert plan.check_inputs(MINI, trace, hw) == []
    with pytest.raises(InputError, match="made from trace .* not from .*u.bin.*--force"):
        plan.check_inputs(MINI, other, hw)
    a100 = get_profile("a100-80gb-pcie4")
    with pytest.raises(InputError, match="hardware profile 'h100-sxm-pcie5' .* not 'a100-80gb-pcie4'"):
        plan.check_inputs(MINI, trace, a100)
    warnings = plan.check_inputs(MINI, other, a100, force=True)
    assert len(warnings) == 2 and "u.bin" in warnings[0] and "a100-80gb-pcie4" in warnings[1]
