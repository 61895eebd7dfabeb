"""Per-workload derived values (tidesim.workload.PerWorkload): made once per live workload object."""

from __future__ import annotations

import gc
from dataclasses import replace

from tidesim.bundled.paths import bundled_traces
from tidesim.trace.io import read_trace
from tidesim.workload import PerWorkload, workload_from_trace


def test_values_are_made_once_per_workload_object_and_dropped_with_it() -> None:
    made: list[int] = []

    def make(w) -> int:  # type: ignore[no-untyped-def]
        made.append(w.num_forwards)
        return len(made)

    kept = PerWorkload(make)
    w = workload_from_trace(read_trace(bundled_traces()["llada2-flash_prefix_g256"]))
    assert kept(w) == 1 and kept(w) == 1           # the same object: made once
    other = replace(w)                             # equal arrays, another object: made again
    assert kept(other) == 2 and kept(w) == 1
    assert len(kept._kept) == 2
    del other
    gc.collect()
    assert len(kept._kept) == 1                    # the entry went with its workload
