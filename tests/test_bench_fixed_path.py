"""bench/bench_fixed_path.py: the executor's fixed path beside calibrate's FixedPath (smoke test on
the tiny preset's synthesized trace; bad input exits 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_fixed_path as bench  # noqa: E402

from tidesim.models import PRESETS  # noqa: E402
from tidesim.trace import write_trace  # noqa: E402
from tidesim.trace.synth import SynthConfig, synthesize  # noqa: E402


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("t") / "tiny.parquet"
    write_trace(synthesize(SynthConfig(model=PRESETS["tiny"], prompts=1, gen_length=8, block_length=4,
                                       prompt_length=4, seed=1)), path)
    return path


def test_pairs_print_the_executor_and_the_probe(tiny_trace, capsys) -> None:  # type: ignore[no-untyped-def]
    assert bench.main(["--trace", str(tiny_trace), "--hw", str(REPO / "hwprofiles/dev-2core-cpu.yaml"), "--budget", "4",
                       "--forwards", "3", "--pairs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu-routing B=4, forwards 0..2") and len(lines) == 3
    assert all("executor gpu_fixed" in line and "FixedPath" in line for line in lines[1:])


def test_a_start_beyond_the_trace_exits_2(tiny_trace) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as e:
        bench.main(["--trace", str(tiny_trace), "--hw", str(REPO / "hwprofiles/dev-2core-cpu.yaml"), "--start", "999"])
    assert e.value.code == 2
