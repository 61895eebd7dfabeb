"""`tidesim generate` wall time with the old CPU expert path against other CPU kernels (issue 25).

Runs the same decode with each --cpu-kernel back to back in one invocation, interleaved (A, B,
A, B, ...), each run with --check-lossless, and reports per kernel the median wall time of the
command, its decode time and forward time (summary.json), whether the tokens were identical to
the plain decode, and the ratio of the medians to the first kernel's. `linear` is the CPU path on
main before issue 25 (F.linear, the reference model's arithmetic). The static GPU set of
cpu-routing comes from one tide run made first (--static-from, as docs/validation.md does).

    .venv/bin/python bench/bench_cpu_generate.py [--kernels linear,weights-left] [--repeats 2]
        [--policy cpu-routing] [--config docs/examples/mini-shapes-64e] [--gen-length 32]
        [--static-from RUN_DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TIDESIM = [sys.executable, "-m", "tidesim"]


def decode_args(args: argparse.Namespace) -> list[str]:
    return ["--config", args.config, "--prompts", args.prompts, "--budget", str(args.budget), "--device", "cpu",
            "--gen-length", str(args.gen_length), "--block-length", str(args.block_length), "--threshold", "1.0"]


def generate(args: argparse.Namespace, extra: list[str], out: Path) -> tuple[float, dict[str, Any]]:
    """(wall seconds of the command, its summary.json)."""
    cmd = TIDESIM + ["generate"] + decode_args(args) + extra + ["-o", str(out), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_cpu_generate: {' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return wall, json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default="linear,weights-left", help="the first is the baseline")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--policy", default="cpu-routing")
    p.add_argument("--config", default="docs/examples/mini-shapes-64e")
    p.add_argument("--prompts", default="docs/examples/prompts-16-tokens.txt")
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--static-from", metavar="TRACE|RUN_DIR",
                   help="cpu-routing's static set from this earlier run (default: one tide run made first)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    kernels = [k for k in args.kernels.split(",") if k]
    if len(kernels) < 2 or not 1 <= args.repeats <= 50:
        print("bench_cpu_generate: give at least two --kernels and --repeats in 1..50", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kernels}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-generate-") as tmp:
        static = Path(args.static_from) if args.static_from else Path(tmp) / "static"
        if not args.static_from:
            generate(args, ["--policy", "tide"], static)
        for r in range(args.repeats):
            for k in kernels:
                out = Path(tmp) / f"{k}-{r}"
                wall, s = generate(args, ["--policy", args.policy, "--static-from", str(static), "--cpu-kernel", k,
                                          "--check-lossless"], out)
                runs[k].append({"wall_s": wall, "decode_s": s["totals"]["decode_s"],
                                "forward_time_s": s["totals"]["forward_time_s"],
                                "identical": s["lossless"]["identical"], "reference": s["lossless"].get("reference"),
                                "cpu_tokens": s["totals"]["cpu_tokens"], "load": list(os.getloadavg())})
    base = statistics.median(x["decode_s"] for x in runs[kernels[0]])
    rows = []
    for k in kernels:
        dec = statistics.median(x["decode_s"] for x in runs[k])
        rows.append({"kernel": k, "wall_s": statistics.median(x["wall_s"] for x in runs[k]), "decode_s": dec,
                     "forward_time_s": statistics.median(x["forward_time_s"] for x in runs[k]),
                     "speedup_decode": base / dec if dec else 0.0,
                     "lossless": all(x["identical"] for x in runs[k]), "runs": runs[k]})
    print(f"tidesim generate --policy {args.policy} {' '.join(decode_args(args))}; {args.repeats} runs per kernel, "
          "interleaved; medians")
    print(f"{'kernel':<14} {'wall s':>8} {'decode s':>9} {'forward s':>10} {'speed-up':>9} lossless")
    for r in rows:
        print(f"{r['kernel']:<14} {r['wall_s']:>8.2f} {r['decode_s']:>9.2f} {r['forward_time_s']:>10.2f} "
              f"{r['speedup_decode']:>8.2f}x {'yes' if r['lossless'] else 'NO'}")
    if args.json:
        out_path = Path(args.json)
        tmp_path = out_path.with_name(out_path.name + ".tmp")
        tmp_path.write_text(json.dumps({"date": datetime.now(UTC).isoformat(timespec="seconds"),
                                        "args": vars(args), "rows": rows}, indent=1))
        tmp_path.replace(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
