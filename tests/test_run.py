"""run(): the one entry point; engines, checks, timelines and byte-identical output."""

import json

import pytest
from simkit import all_gpu, blank, on_demand, profile, random_schedule, workload

from tidesim.errors import InputError
from tidesim.run import run
from tidesim.schedule import GPU
from tidesim.sim.timeline import Timeline

W = workload([[[1, 0, 2, 0], [0, 3, 0, 1]], [[2, 2, 0, 0], [1, 0, 0, 1]]])


def test_unknown_engine_and_timeline_with_analytic_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="engine must be one of"):
        run(W, all_gpu(W), profile(), engine="fast")
    with pytest.raises(InputError, match="timeline needs the simulator"):
        run(W, all_gpu(W), profile(), engine="analytic", timeline=tmp_path / "t.json")


def test_invalid_schedule_is_refused():
    s = blank(W)
    s.placement[W.expert_tokens > 0] = GPU          # runs on the GPU without being resident
    with pytest.raises(InputError, match="invalid schedule"):
        run(W, s, profile())


def test_metrics_fields_and_engine_names():
    for engine in ("sim", "analytic"):
        m = run(W, on_demand(W), profile(), engine=engine)
        assert m.engine == engine and m.policy == "hand"
        assert m.lower_bound_s is not None and m.lower_bound_s <= m.total_time_s * (1 + 1e-12)
        assert set(m.busy_s) == {"gpu", "h2d", "d2h", "cpu"}
        assert m.notes  # the test profile has no attention measurement: the roofline use is flagged


def test_identical_inputs_give_identical_bytes(tmp_path):
    sched = random_schedule(W, budget=2, seed=1)
    outs = []
    for i in range(2):
        path = tmp_path / f"t{i}.json"
        m = run(W, sched, profile(workers=2), timeline=path)
        outs.append((json.dumps(m.to_dict(), sort_keys=True), path.read_bytes()))
    assert outs[0] == outs[1]


def test_timeline_rows_and_events(tmp_path):
    path = tmp_path / "t.json"
    run(W, on_demand(W), profile(), timeline=path)
    data = json.loads(path.read_text())
    names = {e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"}
    assert {"GPU stream", "H2D copy engine", "D2H copy engine", "CPU worker 0"} <= names
    copies = [e for e in data["traceEvents"] if e["ph"] == "X" and e["cat"] == "on_demand"]
    assert len(copies) == 8 and all(e["dur"] == pytest.approx(3000.0) for e in copies)
    tl = Timeline()
    run(W, on_demand(W), profile(), timeline=tl)
    assert len(tl.events) == len([e for e in data["traceEvents"] if e["ph"] == "X"])
