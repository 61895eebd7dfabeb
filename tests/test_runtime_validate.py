"""Validation library: configurations, input checks, prediction vs measurement, outputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine import executor as executor_mod  # noqa: E402
from tidesim_runtime.engine.device import select_device  # noqa: E402
from tidesim_runtime.measure.validate import Config, build, check_inputs, configurations, figure, summary, validate  # noqa: E402

from tidesim.errors import InputError  # noqa: E402
from tidesim.hardware import get_profile  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402
from tidesim.run import run  # noqa: E402
from tidesim.trace.synth import SynthConfig, synthesize  # noqa: E402
from tidesim.workload import workload_from_trace  # noqa: E402

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def workload():
    trace = synthesize(SynthConfig(model=TINY, prompts=1, gen_length=16, block_length=8, prompt_length=8, seed=3))
    return workload_from_trace(trace)


def test_configurations_expand_tau_only_for_tide_policies() -> None:
    configs = configurations(["cpu-routing", "tide", "all-gpu", "tide"], [4, 8], [2, 3], "async", 16)
    labels = [c.label for c in configs]
    assert labels == ["cpu-routing B=4", "cpu-routing B=8",
                      "tide B=4 tau=2 async", "tide B=4 tau=3 async", "tide B=8 tau=2 async", "tide B=8 tau=3 async",
                      "all-gpu B=16"]
    assert configs[0].refresh == "sync" and configs[2].refresh == "async"
    both = configurations(["fiddler", "tide"], [4], [2], ["sync", "async"], 16)
    assert [c.label for c in both] == ["fiddler B=4", "tide B=4 tau=2", "tide B=4 tau=2 async"]


def test_window_after_the_first_block_starts_at_the_second_block(workload) -> None:
    from tidesim_runtime.measure.validate import window

    start = int(np.flatnonzero(workload.block > 0)[0])
    w = window(workload, 3, after_first_block=True)
    assert w.num_forwards == 3 and np.array_equal(w.expert_tokens, workload.expert_tokens[start:start + 3])
    assert window(workload, None, False) is workload
    assert window(workload, 2, False).num_forwards == 2


def test_check_inputs_refuses_budgets_beyond_the_experts(workload) -> None:
    with pytest.raises(InputError, match="--budgets must lie in 0..16 experts per layer"):
        check_inputs(workload, [Config("tide", 17, 2, "sync")], select_device("cpu"), None)


def test_check_inputs_refuses_too_little_host_memory(workload, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_mod, "host_memory_available", lambda: 1024)
    with pytest.raises(InputError, match="host memory"):
        check_inputs(workload, [Config("tide", 4, 2, "sync")], select_device("cpu"), None)


def test_validate_pairs_the_simulator_with_the_runtime(workload, tmp_path) -> None:
    hw = get_profile("h100-sxm-pcie5")
    configs = configurations(["cpu-routing", "tide", "full-swap", "all-gpu"], [6], [2], "sync", TINY.num_experts)
    from tidesim.cli.validate_cmd import IncrementalResults, configuration_record

    done: list[str] = []
    saved = IncrementalResults(tmp_path / "configurations.jsonl")

    def on_done(o) -> None:  # type: ignore[no-untyped-def]
        assert len(o.repeats_s) == 2          # its last repeat is measured
        saved.add(configuration_record(o))
        # written at once: a run cut off now keeps every configuration measured so far
        assert len((tmp_path / "configurations.jsonl").read_text().splitlines()) == len(done) + 1
        done.append(o.config.label)

    outcomes = validate(workload, hw, configs, select_device("cpu"), repeats=2, on_done=on_done)
    assert [o.config for o in outcomes] == configs and sorted(done) == sorted(c.label for c in configs)
    assert [p.name for p in tmp_path.iterdir()] == ["configurations.jsonl"]     # no temp file left
    for o in outcomes:
        schedule = build(o.config, workload, hw, None)
        again = run(workload, schedule, hw, engine="sim")
        assert o.predicted.step_time_s == pytest.approx(again.step_time_s)   # the simulator's prediction
        assert o.measured.engine == "runtime" and o.predicted.engine == "sim"
        assert o.measured.expert_copies == o.predicted.expert_copies       # the same Schedule ran
        assert o.measured.cpu_tokens == o.predicted.cpu_tokens
        assert len(o.repeats_s) == 2
        assert o.measured.step_time_s in o.repeats_s or o.measured.step_time_s == pytest.approx(np.median(o.repeats_s))
        assert o.error == pytest.approx((o.predicted.step_time_s - o.measured.step_time_s) / o.measured.step_time_s)
        row = o.row()
        assert row["abs_error"] == pytest.approx(abs(o.error)) and row["config"] == o.config.label
        # a speed probe before each repeat, against the profile's charge for the probed point (the
        # workload's median tokens and context through the fixed path)
        t, c = int(np.median(workload.tokens)), int(np.median(workload.context))
        assert len(o.probe_s) == 2 and all(p > 0 for p in o.probe_s)
        assert o.probe_expected_s == pytest.approx(float(hw.gpu_layer_fixed_time(np.array([t]), np.array([c]),
                                                                                 TINY)[0]))
    record = configuration_record(outcomes[0])
    assert record["probe_s"] == outcomes[0].probe_s and record["probe_expected_s"] == outcomes[0].probe_expected_s
    s = summary(outcomes)
    assert s["configurations"] == 4
    assert s["median_abs_error"] == pytest.approx(float(np.median([abs(o.error) for o in outcomes])))
    png = tmp_path / "fig.png"
    figure(outcomes, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_predicts_with_the_profiles_contention_term(workload) -> None:
    """The prediction validate reports is the simulator's, which charges cpu.gpu_contention: the
    GPU side is stretched by s x min(GPU expert work, CPU makespan) and the CPU tasks alike, so
    a CPU-bound layer grows by s x (GPU expert work)."""
    import dataclasses

    from tidesim_runtime.engine.executor import first_layers

    from tidesim.sim.costs import schedule_costs
    from tidesim.sim.lpt import lpt_makespans

    base = get_profile("h100-sxm-pcie5")
    s = 0.5
    hw = dataclasses.replace(base, cpu=dataclasses.replace(base.cpu, gpu_contention=s))
    one = first_layers(workload.select(np.arange(1)), 1)
    for policy in ("all-gpu", "cpu-routing"):
        schedule = build(Config(policy, 16 if policy == "all-gpu" else 4, None, "sync"), one, hw, None)
        plain = run(one, schedule, base, engine="sim")
        adjusted = run(one, schedule, hw, engine="sim")
        costs = schedule_costs(one, schedule, base)
        gpu_work = float(costs.gpu.grouped[0] + costs.gpu.od_compute_sum[0])
        items = costs.items
        cpu_work = float(lpt_makespans(items.cpu_g, items.cpu_time, items.cpu_expert, 1, costs.rates.workers)[0])
        if policy == "all-gpu":
            assert adjusted.total_time_s == pytest.approx(plain.total_time_s)
        else:
            assert cpu_work > 0 and gpu_work > 0
            gpu_end = gpu_work + s * min(gpu_work, cpu_work)
            act, res = float(costs.copies.act_d2h[0]), float(costs.copies.res_h2d[0])
            cpu_end = act + cpu_work + s * min(gpu_work, cpu_work) + res
            plain_end = max(gpu_work, act + cpu_work + res)
            want = plain.total_time_s - plain_end + max(gpu_end, cpu_end)
            assert adjusted.total_time_s == pytest.approx(want, rel=1e-9)
