"""The demo on a small synthetic mini trace: table, plan, figures and timelines are all written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from browser import check_page

from tidesim.cli import main
from tidesim.demo import DEFAULT_CASES, demo_profiles, run_demo, table_rows
from tidesim.models import PRESETS
from tidesim.trace.io import write_trace
from tidesim.trace.synth import SynthConfig, synthesize

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SynthConfig(model=PRESETS["llada2-mini"], prompts=2, gen_length=64, prompt_length=64, kv_cache="none",
                      seed=3)
    path = tmp_path_factory.mktemp("demo") / "mini-small.parquet"
    write_trace(synthesize(cfg), path)
    return path


def test_demo_writes_report(small_trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    results = run_demo(out, cases=(("llada2-mini", str(small_trace)),), workers=1)
    assert len(results) == len(demo_profiles()) >= 1
    r = results[0]
    assert r.budget == 128 and r.prompts == [1]
    rows = {row[0]: row for row in table_rows(r)}
    assert set(rows) >= {"all-gpu", "full-swap", "cpu-routing", "fiddler", "tide", "tide-reference", "planned",
                         "oracle"}
    best = r.comparison.best_baseline
    assert rows[best][3] == "1.00x"
    # the bound column never promises less than the policy achieves
    for row in rows.values():
        assert row[7] >= row[2] * (1 - 1e-9)
    pngs = [Path(f) for f in r.figures if f.endswith(".png")]
    assert len(pngs) == 4
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    timeline = json.loads((out / "timeline_llada2-mini_h100-sxm-pcie5.json").read_text())
    assert any(e.get("ph") == "X" for e in timeline["traceEvents"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["plan"]["solver_status"] == "optimal"
    assert summary[0]["best_baseline"] == best
    plan = json.loads((out / "plan_llada2-mini_h100-sxm-pcie5.json").read_text())
    assert len(plan["tau"]) == PRESETS["llada2-mini"].num_moe_layers
    # the default-tau rule with a plan: the plan's best single tau where it was evaluated (the
    # held-out prompts, where the demo runs), stated with its reason
    assert r.tau == (plan["heldout"] or plan["calibration"])["best_single_tau"]
    assert r.tau_reason.startswith(f"tau {r.tau}: the plan's best single tau")
    assert summary[0]["plan"]["lagrangian_bound_s"] == plan["oracle_bound_s"]
    # one page to open: per case the policy table and the plan table, every PNG, links to the rest
    page = out / "index.html"
    text = page.read_text()
    assert 'href="timeline_llada2-mini_h100-sxm-pcie5.json"' in text and 'href="summary.json"' in text
    assert 'href="plan_llada2-mini_h100-sxm-pcie5.json"' in text and "Lagrangian bound" in text
    check_page(page, tmp_path / "browser", figures=4 * len(results), tables=2 * len(results))


def test_demo_is_deterministic(small_trace: Path, tmp_path: Path) -> None:
    a = run_demo(tmp_path / "a", cases=(("llada2-mini", str(small_trace)),), workers=1)
    b = run_demo(tmp_path / "b", cases=(("llada2-mini", str(small_trace)),), workers=1)
    assert table_rows(a[0]) == table_rows(b[0])
    for name in ("summary.json", "throughput_llada2-mini_h100-sxm-pcie5.png", "tau_llada2-mini_h100-sxm-pcie5.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_default_cases_are_bundled() -> None:
    from tidesim.bundled.paths import bundled_traces

    assert {trace for _, trace in DEFAULT_CASES} <= set(bundled_traces())


def test_bad_workers_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def _fake_cases(fail: bool):
    """Stands in for the cases: writes part of a report, then fails (Ctrl-C) or writes summary.json."""
    def run(out: Path, step, cases, workers):
        (out / "plan_x.json").write_text("{}\n")
        if fail:
            raise KeyboardInterrupt
        (out / "summary.json").write_text("[]\n")
        return []
    return run


def test_interrupted_demo_leaves_no_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tidesim.demo as demo

    monkeypatch.setattr(demo, "_run_cases", _fake_cases(fail=True))
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "report")
    assert list(tmp_path.iterdir()) == []                 # neither the report nor its temporary folder


def test_demo_replaces_a_previous_report_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tidesim.demo as demo
    from tidesim.errors import InputError

    monkeypatch.setattr(demo, "_run_cases", _fake_cases(fail=False))
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text("old\n")
    (out / "stale.png").write_bytes(PNG)
    run_demo(out)
    assert sorted(p.name for p in out.iterdir()) == ["plan_x.json", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    with pytest.raises(InputError, match="holds other files and no tidesim report"):
        run_demo(mine)
    assert (mine / "notes.txt").read_text() == "keep me\n"
