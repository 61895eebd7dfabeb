"""Grid files: parsing, validation up front (one-line errors), expansion order and stable ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tidesim.errors import InputError
from tidesim.models import PRESETS
from tidesim.sweep.grid import PARAMS, load_grid, parse_grid

DOCS_EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def grid(parameters, **top):
    return parse_grid({"parameters": parameters, **top}, source="g.yaml", check_policies=False)


def test_cartesian_product_last_axis_fastest_and_defaults_filled():
    g = grid({"model": "tiny", "gen_length": 64, "pcie_gen": [3, 5], "tau": [1, 2, 4]})
    assert len(g) == 6
    assert [(p.params["pcie_gen"], p.params["tau"]) for p in g.points] == [
        (3, 1), (3, 2), (3, 4), (5, 1), (5, 2), (5, 4)]
    assert [p.index for p in g.points] == list(range(6))
    assert g.axes == ["pcie_gen", "tau"]
    first = g.points[0].params
    assert set(first) == set(PARAMS)
    assert first["block_length"] == 32 and first["threshold"] == 0.95 and first["engine"] == "analytic"
    assert first["pcie_gbs"] is None and first["trace"] is None
    assert g.points[0].model_spec == PRESETS["tiny"].to_dict()


def test_numbers_are_normalised_so_ids_do_not_depend_on_spelling():
    a = grid({"model": "tiny", "gen_length": 64, "gpu_speed": 2})
    b = grid({"model": "tiny", "gen_length": 64.0, "gpu_speed": 2.0})
    assert a.points[0].id == b.points[0].id
    assert isinstance(a.points[0].params["gpu_speed"], float)
    assert isinstance(b.points[0].params["gen_length"], int)


def test_ids_are_stable_when_the_grid_is_reordered_or_extended():
    small = grid({"model": "tiny", "gen_length": 64, "tau": [1, 2], "pcie_gen": [4]})
    bigger = grid({"pcie_gen": [3, 4], "tau": [4, 2, 1], "gen_length": 64, "model": "tiny"})
    small_ids = {(p.params["tau"], p.params["pcie_gen"]): p.id for p in small.points}
    big_ids = {(p.params["tau"], p.params["pcie_gen"]): p.id for p in bigger.points}
    assert small_ids.items() <= big_ids.items()
    assert len(set(big_ids.values())) == 6


def test_ids_change_with_anything_that_changes_the_result():
    base = {"model": "tiny", "gen_length": 64}
    ids = {grid({**base, **extra}).points[0].id for extra in
           [{}, {"seed": 1}, {"engine": "sim"}, {"cpu_mem_bw_scale": 2}, {"budget": 4}, {"hw": "a40-pcie4"}]}
    assert len(ids) == 6
    custom = {"wide": {"base": "tiny", "moe_intermediate_size": 128}}
    assert grid({**base, "model": "wide"}, models=custom).points[0].id not in ids


def test_ranges_inclusive_linspace_geomspace():
    g = grid({"model": "tiny", "gen_length": 64, "tau": {"from": 1, "to": 7, "step": 3},
              "pcie_gbs": {"linspace": [10, 20, 3]}, "gpu_speed": {"geomspace": [0.5, 2, 3]}})
    values = lambda name: sorted({p.params[name] for p in g.points})  # noqa: E731
    assert values("tau") == [1, 4, 7]
    assert values("pcie_gbs") == [10.0, 15.0, 20.0]
    assert values("gpu_speed") == [0.5, 1.0, 2.0]
    fractional = grid({"model": "tiny", "gen_length": 64, "threshold": {"from": 0.8, "to": 0.9, "step": 0.05}})
    assert [p.params["threshold"] for p in fractional.points] == [0.8, 0.85, 0.9]


def test_sections_are_a_union_without_duplicates():
    g = grid([{"model": "tiny", "gen_length": 64, "policy": ["tide"], "tau": [1, 2]},
              {"model": "tiny", "gen_length": 64, "policy": ["tide", "full-swap"], "tau": 2}])
    assert [(p.params["policy"], p.params["tau"]) for p in g.points] == [
        ("tide", 1), ("tide", 2), ("full-swap", 2)]


def test_custom_model_is_a_preset_with_changed_fields():
    g = grid({"model": ["llada2-flash", "flash-wide"], "gen_length": 64},
             models={"flash-wide": {"base": "llada2-flash", "moe_intermediate_size": 2048, "num_layers": 16}})
    spec = g.points[1].model()
    assert spec.name == "flash-wide" and spec.moe_intermediate_size == 2048 and spec.num_layers == 16
    assert spec.hidden_size == PRESETS["llada2-flash"].hidden_size
    # the public code's per-model cap follows the base preset; none for models it never ran
    assert [p.params["budget_cap"] for p in g.points] == [96, 96]
    assert grid({"model": "tiny", "gen_length": 64}).points[0].params["budget_cap"] == "none"


def test_fixed_trace_sets_model_and_decode_columns(tmp_path):
    from tidesim.trace.io import write_trace
    from tidesim.trace.synth import SynthConfig, synthesize

    trace = synthesize(SynthConfig(model=PRESETS["tiny"], prompts=2, gen_length=32, prompt_length=20,
                                   kv_cache="none", seed=3))
    path = write_trace(trace, tmp_path / "t.parquet")
    g = grid({"trace": str(path), "tau": [1, 2]})
    p = g.points[0]
    assert p.params["model"] == "tiny" and p.params["kv_cache"] == "none" and p.params["gen_length"] == 32
    assert p.params["prompts"] == 2 and p.params["seed"] is None
    assert p.trace_sha256 and len(p.trace_sha256) == 64
    # a trace with other bytes gives other ids
    trace2 = synthesize(SynthConfig(model=PRESETS["tiny"], prompts=2, gen_length=32, prompt_length=20,
                                    kv_cache="none", seed=4))
    write_trace(trace2, path)
    assert grid({"trace": str(path), "tau": [1, 2]}).points[0].id != p.id


def test_policies_are_checked_against_the_registry():
    from tidesim.policies import policy_names

    g = parse_grid({"parameters": {"model": "tiny", "gen_length": 64, "policy": policy_names()}})
    assert len(g) == len(policy_names())
    with pytest.raises(InputError, match="unknown policy 'tied'.*did you mean 'tide'"):
        parse_grid({"parameters": {"model": "tiny", "gen_length": 64, "policy": "tied"}})


BAD = [
    ({"parameters": {"pcie_bw": [1, 2]}}, r"unknown parameter 'pcie_bw' \(did you mean 'pcie_gbs'\?\)"),
    ({"parameters": {"tau": []}}, "tau: empty list"),
    ({"parameters": {"tau": {"from": 5, "to": 1}}}, "empty range"),
    ({"parameters": {"pcie_gbs": {"linspace": [1, 2, 0]}}}, "empty range"),
    ({"parameters": {"pcie_gbs": "fast"}}, "expected a number, got 'fast'"),
    ({"parameters": {"tau": 1.5}}, "expected a whole number or best, got 1.5"),
    ({"parameters": {"tau": True}}, "expected a whole number"),
    ({"parameters": {"tau": 0}}, "must be >= 1"),
    ({"parameters": {"threshold": 1.0}}, "must be <= "),
    ({"parameters": {"pcie_gbs": 0}}, "must be > 0"),
    ({"parameters": {"kv_cache": "full"}}, "'full' is not one of none, prefix"),
    ({"parameters": {"pcie_gen": 6}}, "6 is not one of 3, 4, 5"),
    ({"parameters": {"budget": "all"}}, "expected a whole number or memory"),
    ({"parameters": {"model": "llada3"}}, "unknown model 'llada3'"),
    ({"parameters": {"hw": "h100"}}, "unknown hardware profile 'h100'"),
    ({"parameters": {"pcie_gbs": 10, "pcie_gen": 4}}, "give only one of pcie_gbs, pcie_gen, pcie_scale"),
    ({"parameters": {"gen_length": 100}}, "gen_length 100 is not a multiple of block_length 32"),
    ({"parameters": {"model": "tiny", "budget": 17}}, "budget 17 exceeds the 16 experts"),
    ({"parameters": {"tau": {"from": 1, "to": 3, "by": 1}}}, "unknown range key 'by'"),
    ({"parameters": {"gpu_speed": None}}, "null is not allowed"),
    ({"parameters": {"policy": {"from": 1, "to": 2}}}, "give a value or a list"),
    ({"parameter": {"tau": 1}}, r"unknown top-level key 'parameter' \(did you mean 'parameters'\?\)"),
    ({"name": "x"}, "the `parameters` section is missing"),
    ({"parameters": []}, "non-empty list"),
    ({"parameters": {"tau": 1}, "models": {"big": {"base": "llada2-flash", "top_k": 300}}},
     "top_k must not exceed num_experts"),
    ({"parameters": {"tau": 1}, "models": {"big": {"base": "llada2-flash", "hidden": 1}}},
     "unknown model field 'hidden'"),
    ({"parameters": {"tau": 1}, "models": {"big": {"base": "gpt"}}}, "unknown preset 'gpt'"),
    ({"parameters": {"tau": 1}, "models": {"big": {"base": "tiny", "num_layers": "4"}}}, "expected a whole number"),
    ([1, 2], "expected a YAML mapping"),
]


@pytest.mark.parametrize("data, message", BAD, ids=[m for _, m in BAD])
def test_bad_grids_fail_with_one_line(data, message):
    with pytest.raises(InputError, match=message) as exc:
        parse_grid(data, source="bad.yaml", check_policies=False)
    text = str(exc.value)
    assert text.startswith("bad.yaml: ") and "\n" not in text


def test_decode_settings_cannot_vary_on_a_fixed_trace():
    with pytest.raises(InputError, match="block_length is set by the fixed trace"):
        parse_grid({"parameters": {"trace": "x.parquet", "block_length": [16, 32]}}, check_policies=False)


def test_load_grid_file_errors(tmp_path):
    with pytest.raises(InputError, match="no such grid file"):
        load_grid(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: {tau: [1, 2\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_grid(bad)
    missing_trace = tmp_path / "t.yaml"
    missing_trace.write_text("parameters: {trace: nowhere.parquet}\n")
    with pytest.raises(InputError, match="no bundled trace or file 'nowhere.parquet'"):
        load_grid(missing_trace)


def test_relative_paths_resolve_beside_the_grid_file(tmp_path):
    from tidesim.hardware import get_profile

    get_profile("a40-pcie4").save(tmp_path / "mine.yaml")
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"parameters": {"model": "tiny", "gen_length": 64,
                                                                   "hw": "mine.yaml"}}))
    g = load_grid(tmp_path / "g.yaml", check_policies=False)
    assert g.points[0].params["hw"] == str((tmp_path / "mine.yaml").resolve())


@pytest.mark.parametrize("path", sorted(DOCS_EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_grids_are_valid(path):
    g = load_grid(path)
    assert len(g) >= 1
    if path.name == "bench-200.yaml":
        assert len(g) == 200


def test_every_parameter_is_documented():
    text = (DOCS_EXAMPLES.parent / "sweeps.md").read_text()
    for name in PARAMS:
        assert f"| `{name}` |" in text, f"docs/sweeps.md does not document parameter {name}"
