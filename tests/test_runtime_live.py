"""Live mode (runtime/tidesim_runtime/measure/live.py): decoding through the executor is lossless
for every policy, and the check catches a wrong expert weight."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from runtime_cases import SPEC  # noqa: E402
from tidesim_runtime.engine.device import select_device  # noqa: E402
from tidesim_runtime.engine.executor import Executor  # noqa: E402

from tidesim.hardware import get_profile  # noqa: E402
from tidesim.policies import PolicyOptions, uniform  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    from tidesim_runtime.reference.model import build_model

    return build_model(SPEC, seed=0)


LIVE_POLICIES = [("all-gpu", "sync"), ("full-swap", "sync"), ("cpu-routing", "sync"), ("fiddler", "sync"),
                 ("tide", "sync"), ("tide", "async"), ("tide-reference", "sync"), ("tide-reference", "async"),
                 ("tide-split", "sync"), ("tide-split", "async"), ("oracle", "sync")]


@pytest.mark.parametrize("kv_cache", ["none", "prefix"])
def test_lossless_live_decode_for_every_policy(tiny_model, kv_cache: str) -> None:
    """Decoding through the executor gives exactly the plain decode's tokens, for every policy,
    with placements that really use the GPU, the CPU and copies."""
    from tidesim_runtime.measure import live
    from tidesim_runtime.reference.generate import DecodeConfig

    from tidesim.policies import policy_names

    assert {p for p, _ in LIVE_POLICIES} >= set(policy_names(needs_plan=False))
    cfg = DecodeConfig(gen_length=16, block_length=8, kv_cache=kv_cache)
    dev = select_device("cpu")
    L = SPEC.num_moe_layers
    hw = get_profile("h100-sxm-pcie5")
    seen_cpu = seen_copies = False
    runs = [(policy, PolicyOptions(budget=uniform(5, L), tau=uniform(2, L), hw=hw, refresh=refresh))
            for policy, refresh in LIVE_POLICIES]
    calls = []
    real = live.reference_decode

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live, "reference_decode", counted)
        results = live.lossless_checks(tiny_model, [5, 17, 42, 99, 7, 3], cfg, runs, dev)
    assert len(calls) == 1            # one plain decode shared by every policy
    assert [r.policy for r in results] == [p + (" async" if r == "async" else "") for p, r in LIVE_POLICIES]
    for result in results:
        assert result.identical, (result.policy, result.problems)
        assert len(result.live_tokens) > 0 and result.metrics is not None
        seen_cpu |= result.metrics.cpu_tokens > 0
        seen_copies |= result.metrics.expert_copies > 0
    assert seen_cpu and seen_copies


def test_float32_check_of_a_bf16_model_is_identical_and_leaves_the_model(tiny_model) -> None:
    """float32=True checks a float32 copy (bit-identical: same order, float32 weights and sums);
    the bf16 model itself is untouched."""
    from tidesim_runtime.measure import live
    from tidesim_runtime.reference.generate import DecodeConfig
    from tidesim_runtime.reference.model import build_model

    bf16 = build_model(SPEC, torch.bfloat16, seed=0)
    L = SPEC.num_moe_layers
    opts = PolicyOptions(budget=uniform(5, L), tau=uniform(2, L), hw=get_profile("h100-sxm-pcie5"))
    cfg = DecodeConfig(gen_length=8, block_length=8, kv_cache="prefix")
    [result] = live.lossless_checks(bf16, [5, 17, 42, 99, 7, 3], cfg, [("tide", opts)], select_device("cpu"),
                                    float32=True)
    assert result.identical and result.metrics is not None and result.metrics.expert_copies > 0
    assert bf16.dtype == torch.bfloat16 and next(bf16.parameters()).dtype == torch.bfloat16


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
