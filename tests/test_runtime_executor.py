"""The runtime executor: replay, copy engine waits, CPU pool, replay metrics, memory sizing.

Everything runs with the GPU side on the CPU (cpu-as-gpu) on tiny shapes; the CUDA test skips
without a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime_cases import SPEC, manual_schedule, schedule_for, tiny_workload  # noqa: E402
from tidesim_runtime.engine import device as device_mod  # noqa: E402
from tidesim_runtime.engine import executor as executor_mod  # noqa: E402
from tidesim_runtime.engine.device import select_device  # noqa: E402
from tidesim_runtime.engine.executor import Executor, check_memory, first_layers, replay_routing  # noqa: E402
from tidesim_runtime.engine.kernels import swiglu  # noqa: E402
from tidesim_runtime.engine.slots import AFTER_GROUPED, FREE, after_on_demand, plan_slots  # noqa: E402
from tidesim_runtime.engine.streams import D2H, H2D  # noqa: E402

from tidesim.errors import InputError  # noqa: E402
from tidesim.hardware import get_profile  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402
from tidesim.run import run  # noqa: E402
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, CPU, GPU, IDLE  # noqa: E402


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
    routing = replay_routing(counts, 8, SPEC.top_k, torch.device("cpu"))
    routing = replace(routing, weights=torch.rand(routing.tokens.shape[0], generator=gen))
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
        r = replay_routing(counts, 8, SPEC.top_k, torch.device("cpu"))
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


class CountingList(list):  # type: ignore[type-arg]
    """A list that counts how many of its items are looked at (iteration or indexing)."""

    touched = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for item in super().__iter__():
            self.touched += 1
            yield item

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        self.touched += 1
        return super().__getitem__(i)


def test_on_demand_copies_are_issued_in_linear_work() -> None:
    """K on-demand experts through one slot (each copy waits for the previous expert): the
    executor looks at each copy a constant number of times, not once per on-demand expert."""
    k = SPEC.num_experts
    s = manual_schedule(placement=[[GPU] * k], copy=[[COPY_ON_DEMAND] * k], resident=[[False] * (k - 1) + [True]],
                        initial=[False] * k, budget=1)
    plan = plan_slots(s)
    lp = plan.layers[0][0]
    assert len(lp.on_demand) == k and lp.on_demand[-1].wait == after_on_demand(k - 2)
    lp.on_demand = CountingList(lp.on_demand)
    sub = replace(SPEC, num_layers=1, first_dense_layers=0)
    with Executor(sub, 1, select_device("cpu"), 8, 24, forward_fixed=False) as one:
        one.prepare_slots(plan)
        one.begin()
        x = torch.randn(8, SPEC.hidden_size)
        r = replay_routing(np.full(k, 2, dtype=np.int64), 8, SPEC.top_k, torch.device("cpu"))
        with torch.inference_mode():
            one.moe_layer(x, 0, 0, r, lp, moe_in=x)
        one.finish()
    assert one._counts["copies"] == k
    assert lp.on_demand.touched <= 3 * k     # quadratic issue would look k * (k + 2) = 288 times


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


def copies_of(ex: Executor, lp, x, counts) -> list[tuple[str, bool, list]]:  # type: ignore[no-untyped-def]
    """Run one layer with `lp` and return every copy issued: (direction, background, after)."""
    calls: list[tuple[str, bool, list]] = []
    real = ex.backend.copy

    def spy(dst, src, direction, background=False, after=None):  # type: ignore[no-untyped-def]
        calls.append((direction, background, list(after or [])))
        return real(dst, src, direction, background=background, after=after)

    ex.backend.copy = spy  # type: ignore[method-assign]
    try:
        r = replay_routing(counts, 8, SPEC.top_k, torch.device("cpu"))
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


def test_gpu_waits_only_for_the_background_copies_of_the_experts_it_runs() -> None:
    """Forward 0 prefetches experts 1 and 2 in the background; forward 1's grouped kernel runs
    expert 1 only: the compute stream waits for expert 1's copy (its own event) and not for
    expert 2's; the run's end still waits for expert 2's (it is paid for)."""
    idle = [IDLE] * 13
    s = manual_schedule(placement=[[GPU, IDLE, IDLE] + idle, [IDLE, GPU, IDLE] + idle],
                        copy=[[0, COPY_ASYNC_REFRESH, COPY_ASYNC_REFRESH] + [0] * 13, [0] * 16],
                        resident=[[True, True, True] + [False] * 13] * 2, initial=[True] + [False] * 15, budget=3)
    plan = plan_slots(s)
    sub = replace(SPEC, num_layers=1, first_dense_layers=0)
    with Executor(sub, 1, select_device("cpu"), 8, 24, forward_fixed=False) as ex:
        ex.prepare_slots(plan)
        be = ex.backend
        issued: dict[int, object] = {}
        waited: list[list[object]] = []
        real_copy, real_wait = be.copy, be.compute_wait

        def copy(dst, src, direction, background=False, after=None):  # type: ignore[no-untyped-def]
            m = real_copy(dst, src, direction, background=background, after=after)
            if background:
                issued[len(issued) + 1] = m          # experts 1 and 2, in plan order
            return m

        def compute_wait(markers):  # type: ignore[no-untyped-def]
            waited.append(list(markers))
            real_wait(markers)

        be.copy, be.compute_wait = copy, compute_wait  # type: ignore[method-assign]
        try:
            x = torch.randn(8, SPEC.hidden_size)
            ex.begin()
            with torch.inference_mode():
                for f, counts in enumerate(([3] + [0] * 15, [0, 2] + [0] * 14)):
                    r = replay_routing(np.array(counts, dtype=np.int64), 8, SPEC.top_k, torch.device("cpu"))
                    ex.moe_layer(x, 0, 0, r, plan.layers[f][0], moe_in=x)
            before_end = list(waited)
            ex.finish()
        finally:
            del be.copy, be.compute_wait
    assert [op.expert for op in plan.layers[0][0].background] == [1, 2]
    ids = {id(m): e for e, m in issued.items()}
    background_waits = [[ids[id(m)] for m in w if id(m) in ids] for w in before_end]
    assert [w for w in background_waits if w] == [[1]]        # forward 1's grouped kernel: expert 1 only
    assert 2 in [ids.get(id(m)) for w in waited[len(before_end):] for m in w]   # the run's end drains 2's copy
