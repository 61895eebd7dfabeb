import pytest
from simkit import blank, workload

from tidesim.models import ModelSpec
from tidesim.schedule import (
    COPY_ASYNC_REFRESH,
    COPY_ON_DEMAND,
    COPY_SYNC_REFRESH,
    CPU,
    GPU,
    schedule_problems,
)

SPEC = ModelSpec(name="t2x4", num_layers=2, first_dense_layers=1, hidden_size=8, dense_intermediate_size=8,
                 moe_intermediate_size=4, num_experts=4, top_k=1, num_shared_experts=1, num_heads=2,
                 num_kv_heads=1, head_dim=4, vocab_size=16, n_group=1, topk_group=1, dtype="float32")


W = workload([[[2, 1, 0, 0]], [[1, 0, 2, 0]]], spec=SPEC, committed=1)


def valid():
    s = blank(W, budget=2)
    # forward 0: expert 0 copied sync and run on GPU, expert 1 on CPU
    s.copy[0, 0, 0] = COPY_SYNC_REFRESH
    s.placement[0, 0, 0], s.placement[0, 0, 1] = GPU, CPU
    s.resident[0, 0, 0] = True
    # forward 1: expert 0 resident, expert 2 copied on demand
    s.placement[1, 0, 0], s.placement[1, 0, 2] = GPU, GPU
    s.copy[1, 0, 2] = COPY_ON_DEMAND
    s.resident[1, 0, [0, 2]] = True
    return s


def test_workload_arrays():
    assert W.num_forwards == 2 and W.num_layers == 1 and W.num_experts == 4
    assert W.tokens.tolist() == [3, 3] and W.generated_tokens == 2
    assert W.first_block.all()


def test_valid_schedule_has_no_problems():
    s = valid()
    assert schedule_problems(s, W) == []
    assert s.summary()["copies_on_demand"] == 1 and s.summary()["cpu_expert_runs"] == 1


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.placement.__setitem__((0, 0, 1), 0), "lossless"),
    (lambda s: s.placement.__setitem__((0, 0, 3), CPU), "lossless"),
    (lambda s: s.copy.__setitem__((1, 0, 2), 0), "without being resident"),
    (lambda s: s.copy.__setitem__((0, 0, 0), COPY_ASYNC_REFRESH), "without being resident"),
    (lambda s: s.resident.__setitem__((1, 0, 3), True), "without a copy"),
    (lambda s: s.budget.__setitem__(0, 1), "exceed the budget"),
    (lambda s: s.demote.__setitem__((0, 0, 3), True), "not resident"),
])
def test_each_broken_invariant_is_found(corrupt, message):
    s = valid()
    corrupt(s)
    problems = schedule_problems(s, W)
    assert problems and any(message in p for p in problems)
