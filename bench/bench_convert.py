"""How long `tidesim trace convert --from sglang` takes on a 100 MB per_token dump (speed goal: at
most 30 s on a 2-core machine).

Usage: .venv/bin/python bench/bench_convert.py [--repeats N] [--mb 100]
Writes the dump itself, in the recorder's per_token layout (torch.save of {"records": [...],
"last_physical_to_logical_map"}; topk_ids_of_layer int32 [48 layers, tokens, 8] for the
qwen3-30b-a3b preset, input_ids and positions as lists), as a server would after continuous
batching: segments of one 1024-token extend pass (two 512-token prompts) and 64 decode passes of
two tokens, until the file reaches the asked size. Then times the whole command (a fresh process:
start-up, torch.load, checks, counting, validation, Parquet write with token-level routing) and
reports the best of N wall-clock and the child's CPU time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tidesim.models import PRESETS

TIDESIM = [sys.executable, "-m", "tidesim"]
MODEL = PRESETS["qwen3-30b-a3b"]
SLOTS = 8


def _record(rng: np.random.Generator, pass_id: int, positions: np.ndarray, extend: list[int] | None) -> dict:
    import torch

    tokens = positions.size
    keys = rng.random((MODEL.num_layers, tokens, MODEL.num_experts), dtype=np.float32)
    ids = np.argpartition(keys, MODEL.top_k, axis=-1)[..., :MODEL.top_k].astype(np.int32)
    return {"forward_pass_id": pass_id, "rank": 0, "gatherer_key": "primary", "input_ids": [7] * tokens,
            "positions": positions.tolist(), "extend_seq_lens": extend, "forward_mode": 1 if extend else 2,
            "topk_ids_of_layer": torch.from_numpy(ids), "misc_objects": []}


def write_dump(path: Path, megabytes: float) -> tuple[int, int]:
    """The dump; returns (passes, tokens)."""
    import torch

    rng = np.random.default_rng(0)
    per_token = MODEL.num_layers * SLOTS * 4
    records: list[dict] = []
    tokens = 0
    while tokens * per_token < megabytes * 1e6:
        records.append(_record(rng, len(records), np.r_[np.arange(512), np.arange(512)], [512, 512]))
        tokens += 1024
        for j in range(64):
            records.append(_record(rng, len(records), np.array([512 + j, 512 + j]), None))
            tokens += 2
    physical = torch.arange(MODEL.num_experts).repeat(MODEL.num_layers, 1)
    torch.save({"records": records, "last_physical_to_logical_map": physical}, path)
    return len(records), tokens


def run_timed(argv: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mb", type=float, default=100.0, help="dump size in MB (default 100)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "expert_distribution_recorder_0.pt"
        passes, tokens = write_dump(dump, args.mb)
        out = Path(tmp) / "trace.parquet"
        argv = [*TIDESIM, "trace", "convert", "--from", "sglang", str(dump), "--model", MODEL.name, "-o", str(out)]
        runs = [run_timed(argv) for _ in range(args.repeats)]
        result = {"dump_mb": dump.stat().st_size / 1e6, "passes": passes, "tokens": tokens,
                  "trace_mb": out.stat().st_size / 1e6, "wall_s": min(r[0] for r in runs),
                  "cpu_s": min(r[1] for r in runs), "goal_s": 30.0}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
