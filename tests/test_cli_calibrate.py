"""`tidesim calibrate` and `tidesim validate` on the command line: outputs, exit codes, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from browser import check_page

torch = pytest.importorskip("torch")

from tidesim.cli import main  # noqa: E402
from tidesim.hardware import load_profile  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402
from tidesim.trace.io import write_trace  # noqa: E402
from tidesim.trace.synth import SynthConfig, synthesize  # noqa: E402


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory) -> Path:
    trace = synthesize(SynthConfig(model=PRESETS["tiny"], prompts=1, gen_length=16, block_length=8, prompt_length=8,
                                   seed=5))
    path = tmp_path_factory.mktemp("trace") / "tiny.parquet"
    write_trace(trace, path)
    return path


@pytest.fixture(scope="module")
def mini_trace(tmp_path_factory) -> Path:
    trace = synthesize(SynthConfig(model=PRESETS["llada2-mini"], prompts=1, gen_length=32, block_length=32,
                                   prompt_length=16, seed=5))
    path = tmp_path_factory.mktemp("trace") / "mini.parquet"
    write_trace(trace, path)
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("tidesim: error:") and words in err, err


def test_help_lists_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("calibrate", "validate"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: tidesim {cmd}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_calibrate_on_cuda_without_a_gpu_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.yaml"
    one_line_error(capsys, main(["calibrate", "--device", "cuda", "-o", str(out)]), "no CUDA GPU")
    assert not out.exists()


def test_without_torch_both_commands_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    one_line_error(capsys, main(["calibrate", "-o", str(tmp_path / "p.yaml")]), "pip install 'tidesim[runtime]'")
    code = main(["validate", "--trace", "x", "--hw", "y", "-o", str(tmp_path / "r")])
    one_line_error(capsys, code, "pip install 'tidesim[runtime]'")


def test_calibrate_rejects_unknown_models_and_bad_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, main(["calibrate", "--models", "nope", "-o", str(tmp_path / "p.yaml")]), "unknown model")
    one_line_error(capsys, main(["calibrate", "--models", "tiny", "-o", str(tmp_path / "p.txt")]), ".yaml")


@pytest.fixture(scope="module")
def tiny_profile_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prof") / "tiny-cpu.yaml"
    assert main(["calibrate", "--quick", "--models", "tiny", "--device", "cpu", "-o", str(out), "--json"]) == 0
    return out


def test_calibrate_writes_a_loadable_measured_profile(tiny_profile_path: Path) -> None:
    prof = load_profile(tiny_profile_path)
    assert prof.name == "tiny-cpu" and prof.provenance.kind == "measured"
    assert prof.gpu.expert_ffn[0].matches(PRESETS["tiny"])


def test_validate_writes_table_json_parquet_and_figure(tiny_trace: Path, tiny_profile_path: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    code = main(["validate", "--trace", str(tiny_trace), "--hw", str(tiny_profile_path), "--budgets", "6",
                 "--taus", "2", "--policies", "cpu-routing,tide,all-gpu", "--device", "cpu", "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "median |error|" in text and "tide B=6 tau=2" in text
    data = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in data["rows"]] == ["cpu-routing B=6", "tide B=6 tau=2", "all-gpu B=16"]
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["config"]) == [r["config"] for r in data["rows"]]
    assert (out / "predicted_vs_measured.png").read_bytes()[:4] == b"\x89PNG"
    assert data["setup"]["layers_note"] == "the whole model runs"
    page = (out / "index.html").read_text()
    assert "tide B=6 tau=2" in page and "data:image/png;base64," in page and 'href="results.parquet"' in page
    check_page(out / "index.html", tmp_path / "browser", figures=1, tables=1)


def test_validate_default_tau_follows_the_rule(tiny_trace: Path, tiny_profile_path: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tidesim.default_tau import best_tau
    from tidesim.hardware import get_profile
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    expected = best_tau(workload_from_trace(read_trace(tiny_trace)), get_profile(str(tiny_profile_path)), 6, "sync")
    out = tmp_path / "results"
    assert main(["validate", "--trace", str(tiny_trace), "--hw", str(tiny_profile_path), "--budgets", "6",
                 "--policies", "tide", "--device", "cpu", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert expected.line in text and f"tide B=6 tau={expected.tau}" in text


def test_validate_layers_and_forwards_limit_the_run(tiny_trace: Path, tiny_profile_path: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    code = main(["validate", "--trace", str(tiny_trace), "--hw", str(tiny_profile_path), "--budgets", "4",
                 "--policies", "fiddler", "--layers", "2", "--forwards", "3", "--device", "cpu", "-o", str(out),
                 "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["setup"]["moe_layers"] == 2 and data["setup"]["forwards"] == 3
    assert "first 2 of 3 MoE layers" in data["setup"]["layers_note"]


@pytest.mark.parametrize("args,words", [
    (["--budgets", "17"], "--budgets must lie in 0..16 experts per layer"),
    (["--policies", "nope"], "unknown policy"),
    (["--layers", "9"], "--layers must lie in 1..3"),
    (["--repeats", "0"], "--repeats"),
    (["--policies", "planned"], "--plan"),
    (["--cpu-workers", "1"], "differs from the profile's 8 worker"),   # the simulator would use 8
])
def test_validate_bad_input_fails_before_work(tiny_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              args: list[str], words: str) -> None:
    out = tmp_path / "r"
    code = main(["validate", "--trace", str(tiny_trace), "--hw", "h100-sxm-pcie5", "--device", "cpu",
                 "-o", str(out), *args])
    one_line_error(capsys, code, words)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_validate_cuda_without_a_gpu(tiny_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", "--trace", str(tiny_trace), "--hw", "h100-sxm-pcie5", "--device", "cuda",
                 "-o", str(tmp_path / "r")])
    one_line_error(capsys, code, "no CUDA GPU")


def test_validate_refuses_too_many_layers_for_host_memory(mini_trace: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """All 19 mini layers need far more host memory than a test machine gives a float32 run
    (19 x 256 experts x 12.6 MB, plus the slots): refused before anything is allocated."""
    from tidesim_runtime.engine.device import host_memory_available

    if host_memory_available() > 200 * 2**30:
        pytest.skip("this machine has enough memory for the whole model")
    code = main(["validate", "--trace", str(mini_trace), "--hw", "h100-sxm-pcie5", "--device", "cpu",
                 "-o", str(tmp_path / "r")])
    one_line_error(capsys, code, "--layers")


def test_validate_refuses_a_plan_for_another_model(tiny_trace: Path, mini_trace: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    assert main(["plan", "--trace", str(mini_trace), "--hw", "h100-sxm-pcie5", "--gpu-mem-gib", "40",
                 "--taus", "1,2", "--budgets", "64,128", "--oracle-iterations", "1", "-o", str(plan)]) == 0
    capsys.readouterr()
    code = main(["validate", "--trace", str(tiny_trace), "--hw", "h100-sxm-pcie5", "--device", "cpu", "--plan",
                 str(plan), "-o", str(tmp_path / "r")])
    one_line_error(capsys, code, "the plan was made for model")
