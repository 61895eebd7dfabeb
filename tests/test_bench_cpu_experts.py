"""bench/bench_cpu_experts.py in its dry mode (tiny sizes): every kernel that runs here at every
token count, numbers consistent with each other, bad input refused with exit 2."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_cpu_experts as bench  # noqa: E402
import torch  # noqa: E402
from tidesim_runtime.engine import cpu_kernels  # noqa: E402


def test_dry_run_measures_every_kernel_against_the_read_bandwidth(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cpu.json"
    assert bench.main(["--dry", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["setup"]["dry"] is True and data["setup"]["working_set_bytes"] == 4 * 2**20
    cells = {(r["dtype"], r["kernel"], r["tokens"]) for r in rows}
    assert cells >= {(d, k, t) for d in ("bfloat16", "float32") for k in ("linear", "weights-left") for t in (1, 4)}
    assert ("float32", "onednn-packed", 1) in cells
    assert (("bfloat16", "onednn-packed", 1) in cells) == (not cpu_kernels.onednn_unusable(torch.bfloat16))
    for r in rows:
        per = 3 * 128 * 64 * (2 if r["dtype"] == "bfloat16" else 4)   # the tiny preset's expert
        assert r["expert_mb"] * 1e6 == pytest.approx(per)
        assert r["experts"] == max(2, math.ceil(4 * 2**20 / per))
        assert r["gbs"] == pytest.approx(per / (r["best_us"] * 1e-6) / 1e9)
        # one round in the dry mode: the median of paired ratios is that round's pass over its read
        assert r["ratio"] == pytest.approx(r["gbs"] / r["read_gbs"])
        assert r["best_us"] <= r["median_us"]
    printed = capsys.readouterr().out
    assert "read GB/s" in printed and "weights-left" in printed


def test_dry_run_times_the_pools_layer_job_beside_single_calls(tmp_path: Path) -> None:
    """--paths call,pool,pool-each: every kernel as one call per expert, as the pool's layer job
    (avx2-stream's one list per worker where it builds) and as the same job one queue entry per
    expert, each row named by its path."""
    out = tmp_path / "cpu.json"
    kernels = "linear" + ("" if cpu_kernels.KERNELS["avx2-stream"].why_unusable() else ",avx2-stream")
    assert bench.main(["--dry", "--kernels", kernels, "--paths", "call,pool,pool-each", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cells = {(r["dtype"], r["kernel"], r["path"], r["tokens"]) for r in rows}
    assert cells == {(d, k, p, t) for d in ("bfloat16", "float32") for k in kernels.split(",")
                     for p in ("call", "pool", "pool-each") for t in (1, 4)}
    assert all(r["best_us"] > 0 and r["gbs"] > 0 for r in rows)


@pytest.mark.parametrize("argv, words", [
    (["--tokens", "0"], "--tokens"), (["--kernels", "fast"], "--kernels"), (["--models", "gpt"], "--models"),
    (["--dtypes", "int8"], "--dtypes"), (["--working-set-mib", "nan"], "--working-set-mib"),
    (["--threads", "-1"], "--threads"), (["--repeats", "0"], "--repeats"), (["--paths", "call,fast"], "--paths")])
def test_bad_input_exits_2_with_one_line(argv: list[str], words: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
