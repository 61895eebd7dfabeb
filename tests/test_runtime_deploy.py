"""The live engine (tidesim generate): tokens as the plain decode for every online policy and both
KV-cache modes, the executed Schedule equal to the offline builder's on the captured trace, live
statistics equal to the offline counts, the incremental slot plan equal to the replay's, memory
refusals, and the prediction of the same run."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine.device import select_device  # noqa: E402
from tidesim_runtime.engine.executor import BREAKDOWN_KEYS, RunRecord  # noqa: E402
from tidesim_runtime.engine.slots import plan_slots  # noqa: E402
from tidesim_runtime.measure.deploy import (  # noqa: E402
    ForwardTracker,
    LiveEngine,
    OnlineSlots,
    attribute_model_time,
    bind_host_experts,
    check_deploy_memory,
    decision_counts,
    deploy_memory,
    predicted_forwards,
)
from tidesim_runtime.reference.capture import CaptureSettings, capture_trace  # noqa: E402
from tidesim_runtime.reference.generate import DecodeConfig  # noqa: E402
from tidesim_runtime.reference.model import build_model  # noqa: E402

from tidesim.bundled.paths import bundled_traces  # noqa: E402
from tidesim.errors import InputError  # noqa: E402
from tidesim.hardware import get_profile  # noqa: E402
from tidesim.models import get_model  # noqa: E402
from tidesim.policies import PolicyOptions, build_schedule, uniform  # noqa: E402
from tidesim.policies.driver import online_names, online_policy  # noqa: E402
from tidesim.policies.registry import traits  # noqa: E402
from tidesim.run import run  # noqa: E402
from tidesim.schedule import NO_COPY  # noqa: E402
from tidesim.trace.io import read_trace  # noqa: E402
from tidesim.workload import workload_from_trace  # noqa: E402

SPEC = get_model("tiny")
PROMPTS = [[5, 17, 300, 42, 7], [9, 8, 7]]
SETTINGS = CaptureSettings(weights="random (seed 3)", compute_dtype="float32")
HW = get_profile("dev-2core-cpu")
POLICIES = online_names()      # every registered policy that can run live, a new one included


def options_for(name: str, refresh: str = "sync") -> PolicyOptions:
    layers, experts = SPEC.num_moe_layers, SPEC.num_experts
    static = None
    if traits(name).static_set:  # online the static set is given: experts with even ids
        size = 5 if name == "cpu-routing" else 4
        static = np.zeros((layers, experts), dtype=bool)
        static[:, : 2 * size : 2] = True
    return PolicyOptions(budget=uniform(5, layers), tau=np.arange(1, layers + 1), hw=HW, refresh=refresh,
                         static_resident=static)


def decode_plain(cfg: DecodeConfig):  # type: ignore[no-untyped-def]
    model = build_model(SPEC, torch.float32, seed=3)
    return capture_trace(model, SPEC, PROMPTS, cfg, SETTINGS, seed=None)


def decode_live(name: str, cfg: DecodeConfig, options: PolicyOptions):  # type: ignore[no-untyped-def]
    model = build_model(SPEC, torch.float32, seed=3)
    device = select_device("cpu", 1)
    banks = bind_host_experts(model)
    engine = LiveEngine(model, online_policy(name, SPEC, options), device, banks, max_tokens=64, max_context=64)
    return engine.run(PROMPTS, cfg, SETTINGS, seed=None)


@pytest.mark.parametrize("kv_cache", ["none", "prefix"])
@pytest.mark.parametrize("name", POLICIES)
def test_live_decode_is_lossless_and_runs_the_offline_schedule(name: str, kv_cache: str) -> None:
    cfg = DecodeConfig(gen_length=12, block_length=4, kv_cache=kv_cache)
    refresh = "async" if name == "planned" else "sync"
    options = options_for(name, refresh)
    ref_trace, ref_outputs = decode_plain(cfg)
    live = decode_live(name, cfg, options)
    # lossless: the same tokens and the same routing as the plain decode
    assert live.outputs == ref_outputs
    assert np.array_equal(live.trace.expert_tokens, ref_trace.expert_tokens)
    assert live.trace.forwards[["block", "step", "phase"]].equals(ref_trace.forwards[["block", "step", "phase"]])
    # one policy logic: the offline builder on the captured trace gives the executed schedule
    workload = workload_from_trace(live.trace)
    offline = build_schedule(name, workload, options)
    for f in ("budget", "initial_resident", "placement", "copy", "demote", "resident"):
        assert np.array_equal(getattr(live.schedule, f), getattr(offline, f)), f
    # the live statistics are the offline schedule's counts; the executor's copies are its copies
    frame = live.forwards
    for column, values in decision_counts(offline, workload.expert_tokens).items():
        assert frame[column].tolist() == np.asarray(values).tolist(), column
    assert frame["expert_copies"].tolist() == (offline.copy != NO_COPY).sum(axis=(1, 2)).tolist()
    assert int(frame["gpu_tokens"].sum()) == live.metrics.gpu_tokens
    assert (frame["time_s"] > 0).all() and len(frame) == workload.num_forwards


def test_model_module_time_is_charged_as_fixed_gpu_work() -> None:
    """The model's own modules run outside the executor's phases: their time moves from `other`
    to `gpu_fixed` (and GPU busy), never more than `other` holds."""
    rec = RunRecord(10.0, {**dict.fromkeys(BREAKDOWN_KEYS, 0.0), "gpu_experts": 3.0, "other": 7.0}, [], {"gpu": 3.0},
                    0.0, 0.0, 0, 0)
    attribute_model_time(rec, 5.5)
    assert rec.breakdown["gpu_fixed"] == 5.5 and rec.breakdown["other"] == 1.5 and rec.busy["gpu"] == 8.5
    attribute_model_time(rec, 4.0)       # more than is left: capped
    assert rec.breakdown["other"] == 0.0 and rec.breakdown["gpu_fixed"] == 7.0


def test_live_breakdown_adds_up_and_puts_the_model_in_gpu_fixed() -> None:
    live = decode_live("tide", DecodeConfig(gen_length=12, block_length=4, kv_cache="prefix"), options_for("tide"))
    b = live.metrics.breakdown_s
    assert sum(b.values()) == pytest.approx(live.metrics.total_time_s, rel=1e-9)
    assert b["other"] >= 0.0
    # attention, dense layers and lm_head are most of a tiny model's forward; the decoder's host work is not
    assert b["gpu_fixed"] > b["other"]


def test_online_slots_equal_the_replay_slot_plan() -> None:
    """Fed one layer-forward at a time, the incremental slot rule gives plan_slots' plan."""
    w = workload_from_trace(read_trace(bundled_traces()["llada2-mini-4layer_captured_prefix_g256"]))
    w = w.select(np.arange(60))
    for name, budget, refresh in (("tide", 24, "async"), ("full-swap", 6, "sync"), ("tide-reference", 16, "sync")):
        opts = PolicyOptions(budget=uniform(budget, w.num_layers), tau=uniform(2, w.num_layers), hw=HW,
                             refresh=refresh)
        s = build_schedule(name, w, opts)
        want = plan_slots(s)
        slots = OnlineSlots(s.initial_resident, s.budget)
        for f in range(w.num_forwards):
            for layer in range(w.num_layers):
                got = slots.plan(layer, s.placement[f, layer], s.copy[f, layer], s.demote[f, layer],
                                 s.resident[f, layer])
                assert got == want.layers[f][layer], (name, f, layer)
        assert slots.size == want.pool_size and slots.initial_slots == want.initial_slots


def test_forward_tracker_names_prefill_steps_and_commits() -> None:
    cfg = DecodeConfig(gen_length=8, block_length=4, kv_cache="prefix")
    tracker = ForwardTracker(cfg, SPEC.mask_token_id)
    loop = tracker.blocks(0)
    masked = torch.tensor([[SPEC.mask_token_id] * 4])
    assert tracker.next(torch.tensor([[1, 2]]), None, 1).phase == "prefill"
    blocks = loop(range(2))
    assert next(blocks) == 0
    assert tracker.next(masked, [()], 4).phase == "step"
    m = tracker.next(torch.tensor([[1, 2, 3, 4]]), [()], 1)
    assert (m.block, m.step, m.phase) == (0, 1, "commit")
    assert next(blocks) == 1
    m = tracker.next(masked, [()], 4)
    assert (m.index, m.block, m.step, m.phase) == (3, 1, 0, "step")


def test_memory_needs_and_refusals() -> None:
    mini = get_model("llada2-mini")
    cpu = select_device("cpu", 1)
    need = deploy_memory(mini, cpu, uniform(64, mini.num_moe_layers), 64, 512)
    # every routed expert of mini in float32 (cpu-as-gpu) in host banks, plus one layer's bank while binding
    assert need["expert_banks"] == (mini.num_moe_layers + 1) * mini.num_experts * 3 * mini.hidden_size \
        * mini.moe_intermediate_size * 4
    with pytest.raises(InputError, match=r"use --layers \d+ or fewer"):
        check_deploy_memory(mini, cpu, uniform(64, mini.num_moe_layers), 64, 512, host_free=8 * 2**30)
    check_deploy_memory(SPEC, cpu, uniform(5, SPEC.num_moe_layers), 64, 64, host_free=8 * 2**30)


def test_prediction_per_forward_adds_up_to_the_simulated_run() -> None:
    w = workload_from_trace(read_trace(bundled_traces()["llada2-mini-4layer_captured_prefix_g256"]))
    w = w.select(np.arange(40))
    s = build_schedule("tide", w, PolicyOptions(budget=uniform(32, 3), tau=uniform(2, 3), hw=HW))
    metrics, per_forward = predicted_forwards(w, s, HW)
    assert per_forward.shape == (40,) and (per_forward > 0).all()
    assert metrics.total_time_s == pytest.approx(run(w, s, HW, engine="sim").total_time_s)
    assert per_forward.sum() == pytest.approx(metrics.total_time_s)  # sync refresh: no copy in flight at the end
    async_s = build_schedule("tide", w, replace(PolicyOptions(budget=uniform(32, 3), tau=uniform(2, 3), hw=HW),
                                                refresh="async"))
    m2, pf2 = predicted_forwards(w, async_s, HW)
    assert pf2.sum() <= m2.total_time_s + 1e-12


def test_a_forward_ends_with_its_compute_so_async_refresh_spans_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Live forwards wait for the compute stream only (compute_synchronize), never for every copy
    (synchronize drains the background queue): an asynchronous refresh may go on into the next
    forward, as the simulator lets it. Per-forward copy time is still counted, after the run."""
    from tidesim_runtime.engine.streams import HostBackend

    calls: list[str] = []
    in_forward = {"depth": 0}
    real_sync, real_compute = HostBackend.synchronize, HostBackend.compute_synchronize

    def synchronize(self):  # type: ignore[no-untyped-def]
        calls.append("all" if in_forward["depth"] else "outside")
        real_sync(self)

    def compute_synchronize(self):  # type: ignore[no-untyped-def]
        calls.append("compute")
        real_compute(self)

    monkeypatch.setattr(HostBackend, "synchronize", synchronize)
    monkeypatch.setattr(HostBackend, "compute_synchronize", compute_synchronize)
    real_forward = LiveEngine._forward_fn

    def forward_fn(self, tracker):  # type: ignore[no-untyped-def]
        inner = real_forward(self, tracker)

        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            in_forward["depth"] += 1
            try:
                return inner(*args, **kwargs)
            finally:
                in_forward["depth"] -= 1
        return wrapped

    monkeypatch.setattr(LiveEngine, "_forward_fn", forward_fn)
    cfg = DecodeConfig(gen_length=8, block_length=8, kv_cache="prefix")
    result = decode_live("tide", cfg, options_for("tide", "async"))
    forwards = len(result.forwards)
    assert calls.count("compute") == forwards and "all" not in calls
    assert int(result.forwards["copies_async_refresh"].sum()) > 0
    assert (result.forwards["copy_time_s"] >= 0).all() and result.forwards["copy_time_s"].sum() > 0
