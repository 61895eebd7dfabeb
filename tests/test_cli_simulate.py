"""`tidesim simulate` and `tidesim compare`: tables, JSON, figures, timelines and one-line errors."""

import json

import pytest
from simkit import MS, profile, trace

from tidesim.cli import main
from tidesim.trace.io import write_trace

# tokens per forward = 2 (top-2 of 4 experts); all-gpu by hand: 2 x (1 + 2 x 1) ms fixed + experts
COUNTS = [[[1, 1, 2, 0], [0, 2, 1, 1]], [[2, 2, 0, 0], [1, 1, 1, 1]]]
ALL_GPU_MS = 6 + (0.6 + 0.6 + 0.7) + (0.7 + 0.6 + 0.6) + (0.7 + 0.7) + (0.6 * 4)


def plausible(prof):
    """The round-number profile moved inside the plausible ranges (docs/hardware-profiles.md): the
    roofline terms stay negligible next to the 1 ms ones."""
    prof.gpu.mem_bandwidth_gbs = prof.gpu.bf16_tflops = 1e5
    prof.pcie.h2d_gbs = prof.pcie.d2h_gbs = 0.01
    return prof


@pytest.fixture
def files(tmp_path):
    tr = write_trace(trace(COUNTS), tmp_path / "tiny.parquet")
    hw = tmp_path / "round.yaml"
    plausible(profile(workers=2)).save(hw)
    return str(tr), str(hw)


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_simulate_json_matches_hand_timeline(capsys, files):
    tr, hw = files
    code, out, _ = cli(capsys, "simulate", "--trace", tr, "--hw", hw, "--policy", "all-gpu", "--budget", "4", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["metrics"]["total_time_s"] == pytest.approx(ALL_GPU_MS * MS)
    assert data["inputs"]["budget"] == 4 and data["inputs"]["engine"] == "sim"
    assert data["metrics"]["hit_ratio"] == 1.0


def test_simulate_table_timeline_and_analytic(capsys, files, tmp_path):
    tr, hw = files
    tl = tmp_path / "out" / "timeline.json"
    code, out, _ = cli(capsys, "simulate", "--trace", tr, "--hw", hw, "--policy", "cpu-routing", "--budget", "1",
                       "--timeline", str(tl))
    assert code == 0 and "tokens/s" in out and "hit ratio" in out and "perfetto" in out
    events = json.loads(tl.read_text())["traceEvents"]
    assert any(e.get("args", {}).get("name") == "CPU worker 1" for e in events)
    code, out, _ = cli(capsys, "simulate", "--trace", tr, "--hw", hw, "--policy", "tide", "--budget", "2",
                       "--engine", "analytic", "--json")
    assert code == 0 and json.loads(out)["metrics"]["engine"] == "analytic"


def test_compare_table_figure_and_json(capsys, files, tmp_path):
    tr, hw = files
    fig = tmp_path / "bars.png"
    code, out, _ = cli(capsys, "compare", "--trace", tr, "--hw", hw, "--budget", "2", "--figure", str(fig))
    assert code == 0 and fig.read_bytes()[:4] == b"\x89PNG"
    for name in ("all-gpu", "full-swap", "cpu-routing", "fiddler", "tide", "tide-reference", "oracle"):
        assert name in out
    assert "bound" in out and "over the best baseline" in out and "tide:" in out
    code, out, _ = cli(capsys, "compare", "--trace", tr, "--hw", hw, "--budget", "2", "--policies",
                       "full-swap,cpu-routing", "tide", "--json")
    data = json.loads(out)
    assert [p["policy"] for p in data["policies"]] == ["full-swap", "cpu-routing", "tide"]
    best = data["best_baseline"]
    tps = {p["policy"]: p["tokens_per_s"] for p in data["policies"]}
    assert tps[best] == max(tps["full-swap"], tps["cpu-routing"])
    tide = data["policies"][2]
    assert tide["speedup_over_best_baseline"] == pytest.approx(tps["tide"] / tps[best])
    assert tide["speedup_over"]["cpu-routing"] == pytest.approx(tps["tide"] / tps["cpu-routing"])


def test_identical_runs_give_identical_bytes(capsys, files, tmp_path):
    tr, hw = files
    outs = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        fig = tmp_path / str(i) / "f.svg"
        code, out, _ = cli(capsys, "compare", "--trace", tr, "--hw", hw, "--budget", "2", "--json", "--figure",
                           str(fig))
        outs.append((out.replace(str(tmp_path / str(i)), "DIR"), fig.read_bytes(),
                     fig.with_suffix(".html").read_bytes()))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("extra, message", [
    (["--policy", "tide", "--budget", "5"], "--budget must lie in 0..4"),
    (["--policy", "tide", "--budget", "-1"], "--budget must lie in 0..4"),
    (["--policy", "tide", "--tau", "0"], "--tau must be at least 1"),
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--policy", "tide", "--prompts", "3"], "prompt 3 is not in the trace"),
    (["--policy", "tide", "--model", "llada2-mini"], "use a trace of that model"),
    (["--policy", "tide", "--engine", "analytic", "--timeline", "x.json"], "needs the simulator"),
    (["--policy", "tide", "--budget", "2", "--gpu-mem-gib", "3"], "not allowed with argument"),
])
def test_bad_input_is_exit_2_one_line(capsys, files, extra, message):
    tr, hw = files
    code, _, err = cli(capsys, "simulate", "--trace", tr, "--hw", hw, *extra)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_measured_profile_without_the_curve_a_policy_needs(capsys, files, tmp_path):
    tr, _ = files
    prof = plausible(profile())
    prof.cpu.expert_ffn = []            # measured GPU curve only
    path = tmp_path / "gpu_only.yaml"
    prof.save(path)
    code, _, err = cli(capsys, "simulate", "--trace", tr, "--hw", str(path), "--policy", "cpu-routing", "--budget", "1")
    assert code == 2 and "no cpu.expert_ffn curve for 16x8" in err and "cpu-routing" in err
    assert cli(capsys, "simulate", "--trace", tr, "--hw", str(path), "--policy", "all-gpu", "--budget", "4")[0] == 0
    assert cli(capsys, "simulate", "--trace", tr, "--hw", str(path), "--policy", "cpu-routing", "--budget", "1",
               "--allow-roofline")[0] == 0


def test_figure_suffix_checked_before_running(capsys, files):
    tr, hw = files
    code, _, err = cli(capsys, "compare", "--trace", tr, "--hw", hw, "--figure", "out.bmp")
    assert code == 2 and "--figure must end in one of" in err


def test_default_budget_comes_from_gpu_memory(capsys):
    code, out, _ = cli(capsys, "simulate", "--trace", "llada2-mini_prefix_g256", "--hw", "h100-sxm-pcie5",
                       "--policy", "cpu-routing", "--prompts", "0", "--engine", "analytic", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["inputs"]["budget"] == 128 and "capped at 128" in data["inputs"]["budget_source"]
    assert any("roofline" in n for n in data["metrics"]["notes"])


def test_compare_skips_a_policy_that_refuses_the_budget(capsys, files):
    tr, hw = files
    code, out, _ = cli(capsys, "compare", "--trace", tr, "--hw", hw, "--budget", "0", "--json")
    data = json.loads(out)
    assert code == 0 and "full-swap" not in [p["policy"] for p in data["policies"]]
    assert any(n.startswith("full-swap skipped:") for n in data["notes"])
    code, _, err = cli(capsys, "compare", "--trace", tr, "--hw", hw, "--budget", "0", "--policies", "full-swap")
    assert code == 2 and "at least 1 expert slot" in err


def test_compare_leaves_planned_out_without_a_plan(capsys) -> None:
    from tidesim.cli import main as cli_main

    args = ["compare", "--trace", "llada2-flash_prefix_g256", "--hw", "h100-sxm-pcie5", "--prompts", "0",
            "--engine", "analytic", "--json"]
    assert cli_main(args) == 0
    import json

    names = [p["policy"] for p in json.loads(capsys.readouterr().out)["policies"]]
    assert "planned" not in names and "tide" in names
    assert cli_main([*args, "--policies", "tide,planned"]) == 2
    assert "needs --plan" in capsys.readouterr().err
