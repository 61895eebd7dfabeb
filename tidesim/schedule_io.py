"""Schedule files (.npz): the arrays of a Schedule plus its scalars as JSON, written atomically.

`tidesim generate` writes the Schedule it executed (schedule.npz in the run folder); load it to
simulate that very run again or to compare it with build_schedule on the captured trace.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tidesim.atomic import atomic_path
from tidesim.errors import InputError
from tidesim.schedule import Schedule

ARRAYS = ("budget", "initial_resident", "placement", "copy", "demote", "resident")
FORMAT = "tidesim-schedule"
VERSION = 1


def save_schedule(schedule: Schedule, path: str | Path) -> None:
    meta = {"format": FORMAT, "version": VERSION, "policy": schedule.policy, "params": schedule.params,
            "is_bound": schedule.is_bound, "feasible": schedule.feasible,
            "free_async_copies": schedule.free_async_copies}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, meta=np.array(json.dumps(meta, sort_keys=True)),
                            **{name: getattr(schedule, name) for name in ARRAYS})


def load_schedule(path: str | Path) -> Schedule:
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {name: data[name] for name in ARRAYS}
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a schedule file ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise InputError(f"{path}: not a {FORMAT} version {VERSION} file")
    return Schedule(policy=meta["policy"], params=meta["params"], is_bound=meta["is_bound"],
                    feasible=meta["feasible"], free_async_copies=meta["free_async_copies"], **arrays)
