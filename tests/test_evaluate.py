"""tidesim.evaluate and tidesim.notes: one policy of a scenario to metrics plus notes, inputs left as
they were, notes returned (never stored on the profile), caches keyed by content."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tidesim import evaluate as ev
from tidesim.hardware import get_profile
from tidesim.lru import LRU
from tidesim.notes import collecting, note, note_all, noting
from tidesim.scenario import assemble, resolve

TRACE = "llada2-mini-4layer_captured_prefix_g256"
HW = "h100-sxm-pcie5"
ROOFLINE = {"cpu.expert_ffn[2048x512]: roofline estimate (shape not measured)",
            "gpu.attention[llada2-mini-4layer]: roofline estimate (not measured)",
            "gpu.expert_ffn[2048x512]: roofline estimate (shape not measured)"}


def test_notes_reach_every_open_collection_and_nothing_else() -> None:
    note("said with nobody listening")                      # goes nowhere, raises nothing
    with collecting() as outer:
        note("a")
        with collecting() as inner:
            note("b")
            note_all(["c", "b"])
        value, said = noting(lambda: note("d") or 7)
    assert inner == {"b", "c"} and said == frozenset({"d"}) and value == 7
    assert outer == {"a", "b", "c", "d"}


def test_lru_keeps_the_most_recent() -> None:
    kept: LRU[str, int] = LRU(2)
    kept.put("a", 1)
    kept.put("b", 2)
    assert kept.get("a") == 1                               # now the most recent
    kept.put("c", 3)
    assert kept.get("b") is None and kept.kept_keys() == ["a", "c"]


def test_evaluate_returns_the_notes_and_changes_no_input() -> None:
    scenario = resolve(TRACE, HW, ["cpu-routing"], budget=64, engine="analytic")
    profile, key = scenario.hw.to_dict(), scenario.key
    arrays = scenario.workload.expert_tokens.copy()
    result = ev.evaluate(scenario, "cpu-routing")
    # the bundled datasheet profile: every expert and attention cost is a roofline, said as notes
    assert set(result.notes) == ROOFLINE and result.metrics.notes == list(result.notes)
    assert scenario.hw.to_dict() == profile and scenario.key == key
    np.testing.assert_array_equal(scenario.workload.expert_tokens, arrays)
    assert not hasattr(scenario.hw, "flags")                # nothing on the profile to carry notes


def test_a_run_reports_its_own_notes_not_an_earlier_runs() -> None:
    """Notes belong to a run: a measured GPU curve the trace's token counts run past is noted for the
    run on that profile, not for the runs before or after it on the datasheet profile (notes used to
    pile up on a profile object and reach every later run on it)."""
    hw = get_profile(HW)
    tight = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, attention=[]))
    a = resolve(TRACE, tight, ["full-swap"], budget=64, engine="analytic")
    first = ev.evaluate(a, "full-swap")
    from tidesim.hardware import Curve, ExpertCurve

    measured = dataclasses.replace(tight, gpu=dataclasses.replace(
        tight.gpu, expert_ffn=[ExpertCurve(2048, 512, Curve([1.0, 2.0], [30.0, 31.0]))]))
    b = dataclasses.replace(a, hw=measured)
    second = ev.evaluate(b, "full-swap")
    assert any("tokens outside the measured 1..2" in n for n in second.notes)
    assert not any("outside the measured" in n for n in first.notes)
    assert not any("outside the measured" in n for n in ev.evaluate(a, "full-swap").notes)


def test_schedules_are_kept_by_content_and_the_reused_one_gives_the_same_metrics() -> None:
    ev.SCHEDULES.clear()
    one = resolve(TRACE, HW, ["tide"], budget=64, tau=4, engine="analytic")
    two = resolve(TRACE, get_profile(HW), ["tide"], budget=64, tau=4, engine="analytic")   # equal, not the same
    first, again = ev.evaluate(one, "tide"), ev.evaluate(two, "tide")
    assert first.metrics.to_dict() == again.metrics.to_dict() and first.notes == again.notes
    keys = [json.loads(k) for k in ev.SCHEDULES.kept_keys()]
    assert len(keys) == 1 and keys[0][0] == one.workload.digest and keys[0][1] == "tide"
    assert keys[0][-1] is None                               # tide does not read the profile


def test_the_tau_search_notes_are_the_scenarios(monkeypatch: pytest.MonkeyPatch) -> None:
    from tidesim import default_tau

    default_tau._SEARCHED.clear()
    searches: list[int] = []
    search = default_tau._search
    monkeypatch.setattr(default_tau, "_search", lambda *a, **k: searches.append(1) or search(*a, **k))
    scenario = resolve(TRACE, HW, ["tide"], budget=64, engine="analytic")
    assert scenario.tau_choice is not None and scenario.tau_choice.source == "analytic"
    assert set(scenario.notes) == ROOFLINE
    kept = assemble(scenario.trace, scenario.workload, scenario.hw, ["tide"], budget=64, engine="analytic")
    assert kept == scenario and kept.notes == scenario.notes   # searched once, its notes said again
    assert len(searches) == 1
