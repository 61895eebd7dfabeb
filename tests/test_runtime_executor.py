"""The runtime executor: slot plans, copy engine, CPU pool, replay metrics and the lossless check.

Everything runs with the GPU side on the CPU (cpu-as-gpu) on tiny shapes; the CUDA test skips
without a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine import device as device_mod  # noqa: E402
from tidesim_runtime.engine import executor as executor_mod  # noqa: E402
from tidesim_runtime.engine.device import select_device  # noqa: E402
from tidesim_runtime.engine.executor import Executor, LayerRouting, check_memory, first_layers, replay_routing  # noqa: E402
from tidesim_runtime.engine.kernels import swiglu  # noqa: E402
from tidesim_runtime.engine.slots import AFTER_GROUPED, FREE, after_on_demand, plan_slots  # noqa: E402
from tidesim_runtime.engine.streams import D2H, H2D  # noqa: E402

from tidesim.errors import InputError  # noqa: E402
from tidesim.hardware import get_profile  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402
from tidesim.policies import PolicyOptions, build_schedule, uniform  # noqa: E402
from tidesim.run import run  # noqa: E402
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, CPU, GPU, IDLE, Schedule  # noqa: E402
from tidesim.workload import Workload  # noqa: E402

SPEC = PRESETS["tiny"]


def tiny_workload(forwards: int = 6, tokens: int = 8, seed: int = 0) -> Workload:
    """Each token picks top_k distinct experts, skewed toward low ids; prefix-cache-like forwards."""
    rng = np.random.default_rng(seed)
    L, E, k = SPEC.num_moe_layers, SPEC.num_experts, SPEC.top_k
    et = np.zeros((forwards, L, E), dtype=np.int32)
    p = np.linspace(2.0, 0.5, E)
    p /= p.sum()
    for f in range(forwards):
        for layer in range(L):
            for _ in range(tokens):
                et[f, layer, rng.choice(E, size=k, replace=False, p=p)] += 1
    ar = np.arange(forwards, dtype=np.int64)
    return Workload(model=SPEC, kv_cache="prefix", tokens=np.full(forwards, tokens), context=np.full(forwards, 24),
                    committed=np.full(forwards, 2), prompt=np.zeros(forwards, np.int64), block=ar // 3,
                    step=ar % 3, expert_tokens=et)


def schedule_for(policy: str, wl: Workload, budget: int = 6, refresh: str = "sync") -> Schedule:
    hw = get_profile("h100-sxm-pcie5")
    opts = PolicyOptions(budget=uniform(budget, wl.num_layers), tau=uniform(2, wl.num_layers), hw=hw,
                         refresh=refresh)
    return build_schedule(policy, wl, opts)


def manual_schedule(placement: list[list[int]], copy: list[list[int]], resident: list[list[bool]],
                    initial: list[bool], budget: int, demote: list[list[bool]] | None = None) -> Schedule:
    """A one-layer schedule from per-forward rows."""
    pl = np.array(placement, dtype=np.int8)[:, None, :]
    f, _, e = pl.shape
    return Schedule(policy="manual", budget=np.array([budget]), initial_resident=np.array([initial]),
                    placement=pl, copy=np.array(copy, dtype=np.int8)[:, None, :],
                    demote=np.zeros((f, 1, e), bool) if demote is None else np.array(demote)[:, None, :],
                    resident=np.array(resident)[:, None, :])


# ----- slot plan ------------------------------------------------------------------------------
def test_slot_plan_sync_refresh_reuses_the_freed_slot() -> None:
    # experts 0,1 resident in slots 0,1; forward 0 drops 1 (demoted) and refreshes 2 in; 1 runs on CPU
    s = manual_schedule(placement=[[GPU, CPU, GPU, IDLE]], copy=[[0, 0, COPY_SYNC_REFRESH, 0]],
                        resident=[[True, False, True, False]], initial=[True, True, False, False], budget=2,
                        demote=[[False, True, False, False]])
    plan = plan_slots(s)
    lp = plan.layers[0][0]
    assert plan.initial_slots == [{0: 0, 1: 1}]
    assert lp.demotes == [(1, 1)]
    assert [(op.expert, op.slot) for op in lp.sync] == [(2, 1)]
    assert lp.grouped == [(0, 0), (2, 1)]
    assert lp.cpu == [1]
    assert plan.pool_size == [2] and plan.spare == [0]


def test_slot_plan_on_demand_passes_through_when_budget_is_short() -> None:
    # budget 1, three experts copied on demand in one forward: slot 0 serves them one after another
    s = manual_schedule(placement=[[GPU, GPU, GPU]], copy=[[COPY_ON_DEMAND] * 3],
                        resident=[[False, False, True]], initial=[False, False, False], budget=1)
    lp = plan_slots(s).layers[0][0]
    assert [(op.expert, op.slot, op.wait) for op in lp.on_demand] == [(0, 0, FREE), (1, 0, after_on_demand(0)),
                                                                         (2, 0, after_on_demand(1))]


def test_slot_plan_async_copy_waits_for_the_leaving_experts_last_run() -> None:
    # expert 0 resident and used this forward, replaced asynchronously by expert 1
    s = manual_schedule(placement=[[GPU, CPU]], copy=[[0, COPY_ASYNC_REFRESH]], resident=[[False, True]],
                        initial=[True, False], budget=1)
    lp = plan_slots(s).layers[0][0]
    assert lp.grouped == [(0, 0)]
    assert [(op.expert, op.slot, op.wait) for op in lp.background] == [(1, 0, AFTER_GROUPED)]


def test_slot_plan_counts_spare_slots_beyond_the_budget() -> None:
    # two synchronous copies into a budget of 1 (an over-full schedule): one spare slot
    s = manual_schedule(placement=[[GPU, GPU]], copy=[[COPY_SYNC_REFRESH, COPY_SYNC_REFRESH]],
                        resident=[[True, False]], initial=[False, False], budget=1)
    plan = plan_slots(s)
    assert plan.pool_size == [2] and plan.spare == [1]


@pytest.mark.parametrize("policy,refresh", [("full-swap", "sync"), ("tide", "sync"), ("tide", "async"),
                                            ("fiddler", "sync"), ("cpu-routing", "sync")])
def test_slot_plan_keeps_residents_in_distinct_slots(policy: str, refresh: str) -> None:
    wl = tiny_workload()
    s = schedule_for(policy, wl, budget=4, refresh=refresh)
    plan = plan_slots(s)
    for f in range(wl.num_forwards):
        for layer in range(wl.num_layers):
            lp = plan.layers[f][layer]
            slots = [sl for _, sl in lp.grouped]
            assert len(slots) == len(set(slots))
            assert sorted([e for e, _ in lp.grouped] + [op.expert for op in lp.on_demand] + lp.cpu) == \
                np.flatnonzero(wl.expert_tokens[f, layer]).tolist()


# ----- replay ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_executor():
    torch.set_num_threads(1)
    wl = tiny_workload()
    dev = select_device("cpu")
    ex = Executor(SPEC, wl.num_layers, dev, max_tokens=int(wl.tokens.max()), max_context=int(wl.context.max()))
    yield ex, wl
    ex.close()


@pytest.mark.parametrize("policy,refresh", [("all-gpu", "sync"), ("full-swap", "sync"), ("cpu-routing", "sync"),
                                            ("fiddler", "sync"), ("tide", "sync"), ("tide", "async")])
def test_replay_counts_match_the_simulator(tiny_executor, policy: str, refresh: str) -> None:
    ex, wl = tiny_executor
    s = schedule_for(policy, wl, budget=5, refresh=refresh)
    measured = ex.replay(wl, s, warmup=1)
    predicted = run(wl, s, get_profile("h100-sxm-pcie5"), engine="sim")
    for name in ("gpu_tokens", "cpu_tokens", "expert_copies", "refresh_copies", "forwards", "generated_tokens"):
        assert getattr(measured, name) == getattr(predicted, name), name
    assert measured.h2d_bytes == pytest.approx(predicted.h2d_bytes)
    assert measured.d2h_bytes == pytest.approx(predicted.d2h_bytes)
    assert measured.hit_ratio == pytest.approx(predicted.hit_ratio)
    assert measured.engine == "runtime" and measured.total_time_s > 0
    assert sum(measured.breakdown_s.values()) == pytest.approx(measured.total_time_s, rel=1e-9)
    assert set(measured.breakdown_s) == set(predicted.breakdown_s)
    assert len(measured.layer_time_s) == wl.num_layers
    assert measured.step_time_s == pytest.approx(measured.total_time_s / wl.num_forwards)
    if policy in ("all-gpu", "full-swap"):
        assert measured.busy_s["cpu"] == 0.0
    if policy == "cpu-routing":
        assert measured.busy_s["cpu"] > 0 and measured.busy_s["h2d"] > 0  # results come back up


def test_moe_layer_output_does_not_depend_on_placement(tiny_executor) -> None:
    """The same routed pairs give the same output whether experts run grouped, on demand or on
    the CPU (every pair computed exactly once)."""
    ex, wl = tiny_executor
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, SPEC.hidden_size, generator=gen)
    counts = wl.expert_tokens[0, 0].astype(np.int64)
    routing = replay_routing(counts, 8, SPEC.top_k, torch.device("cpu"), torch.float32)
    routing = LayerRouting(routing.tokens, torch.rand(routing.tokens.shape[0], generator=gen), counts)
    want = torch.zeros(8, SPEC.hidden_size)
    host = ex.host[0]
    offs = routing.offsets
    for e in np.flatnonzero(counts):
        tok = routing.tokens[offs[e]:offs[e + 1]]
        want.index_add_(0, tok, swiglu(x[tok], host.w13[e], host.w2[e]) * routing.weights[offs[e]:offs[e + 1], None])
    outs = []
    for policy in ("all-gpu", "cpu-routing", "full-swap", "fiddler"):
        s = schedule_for(policy, wl, budget=3)
        plan = plan_slots(s)
        ex.prepare_slots(plan)
        ex.begin()
        outs.append(ex.moe_layer(x, 0, 0, routing, plan.layers[0][0], moe_in=x))
        ex.finish()
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_replay_rejects_a_workload_with_other_layers(tiny_executor) -> None:
    ex, wl = tiny_executor
    sub = first_layers(wl, 2)
    with pytest.raises(InputError, match="MoE layers"):
        ex.replay(sub, schedule_for("all-gpu", sub))


def test_first_layers_keeps_routing_and_renames_the_model() -> None:
    wl = tiny_workload()
    sub = first_layers(wl, 2)
    assert sub.num_layers == 2 and sub.model.num_moe_layers == 2
    assert np.array_equal(sub.expert_tokens, wl.expert_tokens[:, :2])
    assert "2 of 3 MoE layers" in sub.model.name
    assert sub.model.first_dense_layers == 0 and sub.model.vocab_size == 1  # only MoE layers are charged
    assert sub.model.expert_bytes == SPEC.expert_bytes and sub.model.num_heads == SPEC.num_heads
    with pytest.raises(InputError, match="--layers"):
        first_layers(wl, 4)


# ----- bad input before any work ----------------------------------------------------------------
def test_memory_check_names_the_layers_that_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    mini = PRESETS["llada2-mini"]
    dev = select_device("cpu")
    monkeypatch.setattr(executor_mod, "host_memory_available", lambda: 8 * 2**30)
    with pytest.raises(InputError, match=r"host memory.*--layers"):
        check_memory(mini, 19, dev, slots_per_layer=128, max_tokens=32, max_context=512)
    check_memory(mini, 1, dev, slots_per_layer=16, max_tokens=32, max_context=512)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_a_gpu_is_an_input_error() -> None:
    with pytest.raises(InputError, match="no CUDA GPU"):
        select_device("cuda")


def test_cpu_as_gpu_device_splits_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "cpu_placement", lambda bus_id=None: device_mod.CpuPlacement(tuple(range(8)), None))
    dev = select_device("cpu", cpu_workers=2)
    assert dev.kind == "cpu-as-gpu" and dev.dtype == torch.float32
    assert dev.gpu_threads == 1 and dev.cpu_workers == 2 and dev.cpu_threads_per_worker == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replay_on_cuda_matches_simulator_counts() -> None:
    wl = tiny_workload()
    dev = select_device("cuda")
    with Executor(replace(SPEC, dtype="bfloat16"), wl.num_layers, dev, 8, 24) as ex:
        s = schedule_for("tide", wl, budget=5, refresh="async")
        m = ex.replay(wl, s)
    assert m.expert_copies == int((s.copy > 0).sum())
    assert sum(m.breakdown_s.values()) == pytest.approx(m.total_time_s, rel=1e-6)


# ----- live mode: the lossless check -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from tidesim_runtime.reference.model import build_model

    return build_model(SPEC, seed=0)


LIVE_POLICIES = [("all-gpu", "sync"), ("full-swap", "sync"), ("cpu-routing", "sync"), ("fiddler", "sync"),
                 ("tide", "sync"), ("tide", "async"), ("tide-reference", "sync"), ("tide-reference", "async"),
                 ("oracle", "sync")]


@pytest.mark.parametrize("kv_cache", ["none", "prefix"])
def test_lossless_live_decode_for_every_policy(tiny_model, kv_cache: str) -> None:
    """Decoding through the executor gives exactly the plain decode's tokens, for every policy,
    with placements that really use the GPU, the CPU and copies."""
    from tidesim_runtime.measure.live import lossless_check
    from tidesim_runtime.reference.generate import DecodeConfig

    from tidesim.policies import policy_names

    assert {p for p, _ in LIVE_POLICIES} >= set(policy_names()) - {"planned"}
    cfg = DecodeConfig(gen_length=16, block_length=8, kv_cache=kv_cache)
    dev = select_device("cpu")
    L = SPEC.num_moe_layers
    hw = get_profile("h100-sxm-pcie5")
    seen_cpu = seen_copies = False
    for policy, refresh in LIVE_POLICIES:
        opts = PolicyOptions(budget=uniform(5, L), tau=uniform(2, L), hw=hw, refresh=refresh)
        result = lossless_check(tiny_model, [5, 17, 42, 99, 7, 3], cfg, policy, opts, dev)
        assert result.identical, (policy, refresh, result.problems)
        assert len(result.live_tokens) > 0 and result.metrics is not None
        seen_cpu |= result.metrics.cpu_tokens > 0
        seen_copies |= result.metrics.expert_copies > 0
    assert seen_cpu and seen_copies


def test_lossless_check_detects_a_wrong_expert_weight(tiny_model) -> None:
    """A corrupted host copy of one expert changes the output: the check must catch it."""
    from tidesim_runtime.measure import live
    from tidesim_runtime.reference.generate import DecodeConfig

    cfg = DecodeConfig(gen_length=8, block_length=8, kv_cache="prefix")
    L = SPEC.num_moe_layers
    opts = PolicyOptions(budget=uniform(0, L), tau=uniform(2, L), hw=get_profile("h100-sxm-pcie5"))
    real = live.stacked_experts

    def corrupted(block):  # type: ignore[no-untyped-def]
        w13, w2 = real(block)
        return w13, w2 * 3.0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live, "stacked_experts", corrupted)
        result = live.lossless_check(tiny_model, [5, 17, 42, 99, 7, 3], cfg, "cpu-routing", opts, select_device("cpu"))
    assert not result.identical and result.problems


# ----- GPU readiness on the shared paths -----------------------------------------------------------
def fake_cuda_device() -> device_mod.DeviceInfo:
    """A CUDA DeviceInfo for the sizing logic (no CUDA call is made before the pinned check)."""
    return device_mod.DeviceInfo("cuda", torch.device("cpu"), torch.bfloat16, "test GPU", 80 * 2**30, 0, 1, 4)


def test_memory_needs_count_spare_slots_routing_and_pinned_pages() -> None:
    mini = PRESETS["llada2-mini"]
    dev = fake_cuda_device()
    eb = 3 * mini.hidden_size * mini.moe_intermediate_size * 2
    base = executor_mod.memory_needs(mini, 2, dev, 4, 32, 512, forward_fixed=False)
    spare = executor_mod.memory_needs(mini, 2, dev, [5, 6], 32, 512, forward_fixed=False)
    assert spare["device"] - base["device"] == 3 * eb            # 1 + 2 spare slots
    routed = executor_mod.memory_needs(mini, 2, dev, 4, 32, 512, forward_fixed=False, routing_pairs=1000)
    assert routed["device"] - base["device"] == 1000 * (8 + 2)   # int64 token + bf16 weight per pair
    staging = 32 * mini.top_k * mini.hidden_size * 2             # one pinned staging buffer
    assert base["pinned"] == 2 * 256 * eb + 2 * staging           # whole pages already: no rounding
    assert base["host"] == 2 * 256 * eb + 2 * staging
    ws = executor_mod.workspace_bytes(mini, 32, 512, 2)
    assert ws > 4 * 32 * mini.top_k * mini.hidden_size * 2       # at least the four pair buffers
    assert base["device"] > 2 * 4 * eb + ws
    assert executor_mod.memory_needs(mini, 2, select_device("cpu"), 4, 32, 512)["pinned"] == 0


def test_pinned_memory_is_capped_below_host_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    mini = PRESETS["llada2-mini"]
    monkeypatch.setattr(executor_mod, "host_memory_available", lambda: 60 * 2**30)
    monkeypatch.setattr(executor_mod, "host_memory_total", lambda: 64 * 2**30)
    # a layer bank is 1.61 GB (1.5 GiB) pinned; half of 64 GiB holds 21 of them less the staging
    with pytest.raises(InputError, match=r"pinned host memory.*--layers 21 or fewer"):
        check_memory(mini, 23, fake_cuda_device(), slots_per_layer=16, max_tokens=32, max_context=512)


def test_on_demand_expert_launches_the_runtimes_count(tiny_executor) -> None:
    """The runtime's on-demand path launches ONDEMAND_LAUNCHES kernels per expert (the model's
    ONDEMAND_LAUNCHES_PER_EXPERT must match it); counted at torch's dispatcher."""
    from test_runtime_kernels import count_kernels

    ex, wl = tiny_executor
    s = manual_schedule(placement=[[GPU, GPU, GPU] + [IDLE] * 13], copy=[[COPY_ON_DEMAND] * 3 + [0] * 13],
                        resident=[[False, False, True] + [False] * 13], initial=[False] * 16, budget=1)
    plan = plan_slots(s)
    lp = plan.layers[0][0]
    assert [op.wait for op in lp.on_demand] == [FREE, after_on_demand(0), after_on_demand(1)]
    sub = replace(SPEC, num_layers=1, first_dense_layers=0)
    with Executor(sub, 1, select_device("cpu"), 8, 24, forward_fixed=False) as one:
        one.prepare_slots(plan)
        one.begin()
        x = torch.randn(8, SPEC.hidden_size)
        counts = np.array([3, 2, 4] + [0] * 13, dtype=np.int64)
        r = replay_routing(counts, 8, SPEC.top_k, torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            st = one._front(x, 0, 0, r, lp, moe_in=x)
            one._sync_refresh(st)
            one._start_cpu(st)
            one._issue_on_demand(st, FREE)
            one._grouped(st)
            ops = count_kernels(lambda: one._on_demand(st))
            out = one._combine(st)
        one.finish()
        assert len(ops) == executor_mod.ONDEMAND_LAUNCHES * 3
        want = torch.zeros(8, SPEC.hidden_size)
        offs = r.offsets
        for e in range(3):
            tok = r.tokens[offs[e]:offs[e + 1]]
            want.index_add_(0, tok, swiglu(x[tok], one.host[0].w13[e], one.host[0].w2[e]) / SPEC.top_k)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_results_copy_waits_for_the_gpu_to_read_the_last_results(tiny_executor) -> None:
    """The H2D of CPU results into the device buffer is ordered after the compute stream's work
    so far (the previous layer read the same buffer), and the activations' D2H likewise."""
    ex, wl = tiny_executor
    s = schedule_for("cpu-routing", wl, budget=3)
    calls: list[tuple[int, str, int]] = []
    real = ex.backend.copy

    def spy(dst, src, direction, background=False, after=None):  # type: ignore[no-untyped-def]
        calls.append((dst.data_ptr(), direction, len(after or [])))
        return real(dst, src, direction, background=background, after=after)

    ex.backend.copy = spy  # type: ignore[method-assign]
    try:
        ex.replay(wl, s, warmup=0)
    finally:
        del ex.backend.copy
    results = [c for c in calls if c[0] == ex.res_dev.data_ptr()]
    down = [c for c in calls if c[0] == ex.act_host.data_ptr()]
    assert results and all(direction == H2D and waits == 1 for _, direction, waits in results)
    assert down and all(direction == D2H and waits == 1 for _, direction, waits in down)


def test_live_mode_uses_the_models_dtype_for_staging(tiny_model) -> None:
    from tidesim_runtime.engine.slots import host_experts_from
    from tidesim_runtime.measure.live import live_device, stacked_experts

    dev = replace(select_device("cpu"), dtype=torch.bfloat16)
    live = live_device(tiny_model, dev)
    assert live.dtype == tiny_model.dtype
    (_, block), *_ = tiny_model.moe_blocks()
    banks = host_experts_from(SPEC, [stacked_experts(block)], torch.bfloat16)
    assert banks[0].flat.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        Executor(SPEC, 1, select_device("cpu"), 8, 24, forward_fixed=False, host_experts=banks)


def copies_of(ex: Executor, lp, x, counts) -> list[tuple[str, bool, list]]:  # type: ignore[no-untyped-def]
    """Run one layer with `lp` and return every copy issued: (direction, background, after)."""
    calls: list[tuple[str, bool, list]] = []
    real = ex.backend.copy

    def spy(dst, src, direction, background=False, after=None):  # type: ignore[no-untyped-def]
        calls.append((direction, background, list(after or [])))
        return real(dst, src, direction, background=background, after=after)

    ex.backend.copy = spy  # type: ignore[method-assign]
    try:
        r = replay_routing(counts, 8, SPEC.top_k, torch.device("cpu"), torch.float32)
        ex.begin()
        with torch.inference_mode():
            ex.moe_layer(x, 0, 0, r, lp, moe_in=x)
        ex.finish()
    finally:
        del ex.backend.copy
    return calls


def test_on_demand_copy_into_a_slot_that_frees_later_waits_for_its_last_run() -> None:
    """Simulator/runtime difference (a): budget 1, three on-demand experts pass through slot 0;
    copy k+1 is issued only after expert k has run and waits for that run (its marker)."""
    s = manual_schedule(placement=[[GPU, GPU, GPU] + [IDLE] * 13], copy=[[COPY_ON_DEMAND] * 3 + [0] * 13],
                        resident=[[False, False, True] + [False] * 13], initial=[False] * 16, budget=1)
    plan = plan_slots(s)
    sub = replace(SPEC, num_layers=1, first_dense_layers=0)
    with Executor(sub, 1, select_device("cpu"), 8, 24, forward_fixed=False) as ex:
        ex.prepare_slots(plan)
        calls = copies_of(ex, plan.layers[0][0], torch.randn(8, SPEC.hidden_size),
                          np.array([3, 2, 4] + [0] * 13, dtype=np.int64))
    h2d = [c for c in calls if c[0] == H2D]
    assert len(h2d) == 3 and not any(bg for _, bg, _ in h2d)
    assert h2d[0][2] == []                              # slot 0 free at the start
    assert len(h2d[1][2]) == 1 and len(h2d[2][2]) == 1  # each waits for the previous expert's run
    assert h2d[1][2][0] is not h2d[2][2][0]


def test_async_copy_into_a_replaced_slot_waits_for_the_grouped_kernel() -> None:
    """Simulator/runtime difference (b): expert 0 is resident and runs in the grouped kernel;
    expert 1 replaces it asynchronously: the background copy waits for the grouped kernel."""
    s = manual_schedule(placement=[[GPU, CPU] + [IDLE] * 14], copy=[[0, COPY_ASYNC_REFRESH] + [0] * 14],
                        resident=[[False, True] + [False] * 14], initial=[True] + [False] * 15, budget=1)
    plan = plan_slots(s)
    lp = plan.layers[0][0]
    assert [(op.expert, op.slot, op.wait) for op in lp.background] == [(1, 0, AFTER_GROUPED)]
    sub = replace(SPEC, num_layers=1, first_dense_layers=0)
    with Executor(sub, 1, select_device("cpu"), 8, 24, forward_fixed=False) as ex:
        ex.prepare_slots(plan)
        calls = copies_of(ex, lp, torch.randn(8, SPEC.hidden_size), np.array([5, 3] + [0] * 14, dtype=np.int64))
    background = [c for c in calls if c[1]]
    assert len(background) == 1 and background[0][0] == H2D
    assert len(background[0][2]) == 1   # the grouped kernel's marker
