"""Schedule: the one contract the simulator, the cost model and the runtime all execute.

A policy decides, for every forward pass f and MoE layer l, where each activated expert runs and
which expert weights are copied or dropped; the executors only carry that out. So a difference
between predicted and measured time is a cost-model error, never a policy drift.

Arrays are [F, L, E] (forwards, MoE layers, experts):

placement  0 idle (no tokens routed), 1 runs on the GPU, 2 runs on the CPU.
copy       0 none; 1 on demand (H2D right before this expert runs on the GPU; blocks only it);
           2 synchronous refresh (H2D after the gate, before any expert of the layer runs);
           3 asynchronous refresh (H2D in the background; usable from the next forward on).
demote     True where a resident expert is copied back to host memory (D2H, synchronous), as the
           public TIDE code does; a plain drop (the host already holds the weights) is free and
           only shows as resident going from True to False.
resident   True where the expert occupies a GPU slot at the end of forward f (after all copies,
           asynchronous ones included).

free_async_copies (default False) is set only by bounds (the oracle): its asynchronous refresh
copies (copy=3) are ideal prefetches that take no copy-engine time and are complete when the next
forward starts. Executors count their bytes and copies but charge no time for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from tidesim.workload import Workload

IDLE, GPU, CPU = 0, 1, 2
NO_COPY, COPY_ON_DEMAND, COPY_SYNC_REFRESH, COPY_ASYNC_REFRESH = 0, 1, 2, 3
T = TypeVar("T")


@dataclass
class Schedule:
    """Placement and copies for a workload; see the module docstring for the encoding."""

    policy: str
    budget: np.ndarray               # int [L] GPU expert slots per MoE layer
    initial_resident: np.ndarray     # bool [L, E] resident before the first forward (loaded untimed)
    placement: np.ndarray            # int8 [F, L, E]
    copy: np.ndarray                 # int8 [F, L, E]
    demote: np.ndarray               # bool [F, L, E]
    resident: np.ndarray             # bool [F, L, E]
    params: dict[str, Any] = field(default_factory=dict)
    is_bound: bool = False           # oracle / all-gpu: a limit, not something to deploy
    feasible: bool = True            # False when the budget does not fit the GPU (reported anyway)
    free_async_copies: bool = False  # oracle only: copy=3 costs no time (ideal prefetch); see above
    cells: SparseCells | None = field(default=None, repr=False, compare=False)   # the builder's; see sparse()

    def sparse(self) -> SparseCells:
        """The cells of the copies, the CPU runs and the demotions: those the builder recorded
        (SparseCells.of) while the arrays are still the very, read-only, ones it indexed; else one
        scan of the arrays as they are now (not kept: they may change)."""
        if self.cells is not None and self.cells.indexes(self):
            return self.cells
        return SparseCells.scan(self)

    @property
    def shape(self) -> tuple[int, int, int]:
        f, l, e = self.placement.shape
        return f, l, e

    def resident_before(self) -> np.ndarray:
        """bool [F, L, E]: resident at the start of each forward."""
        return np.concatenate([self.initial_resident[None], self.resident[:-1]], axis=0)

    def on_gpu(self) -> np.ndarray:
        return self.placement == GPU

    def on_cpu(self) -> np.ndarray:
        return self.placement == CPU

    def copied_in(self) -> np.ndarray:
        return self.copy != NO_COPY

    def summary(self) -> dict[str, float]:
        """Counts every executor reports the same way."""
        return {
            "gpu_expert_runs": float(self.on_gpu().sum()),
            "cpu_expert_runs": float(self.on_cpu().sum()),
            "copies_on_demand": float((self.copy == COPY_ON_DEMAND).sum()),
            "copies_sync_refresh": float((self.copy == COPY_SYNC_REFRESH).sum()),
            "copies_async_refresh": float((self.copy == COPY_ASYNC_REFRESH).sum()),
            "demotions": float(self.demote.sum()),
        }


@dataclass(frozen=True)
class SparseCells:
    """Flat indices (f * L * E + l * E + e, ascending) of a schedule's copies (with their kinds),
    of its experts that run on the CPU and of its demotions: all the executors need from the three
    dense arrays, which mark few cells. A builder records them with its schedule (freezing the
    arrays), so that costing the schedule again and again does not scan [F, L, E] each time."""

    copy: np.ndarray
    copy_kind: np.ndarray
    cpu: np.ndarray
    demote: np.ndarray
    arrays: tuple[np.ndarray, ...] = field(repr=False, compare=False)   # the schedule's arrays it describes
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)   # see memo()

    @staticmethod
    def _arrays(s: Schedule) -> tuple[np.ndarray, ...]:
        return s.copy, s.placement, s.demote, s.resident, s.initial_resident, s.budget

    @classmethod
    def scan(cls, s: Schedule) -> SparseCells:
        idx = byte_cells(s.copy)
        return cls(idx, s.copy.reshape(-1)[idx], byte_cells(s.placement, CPU), byte_cells(s.demote), cls._arrays(s))

    @classmethod
    def of(cls, s: Schedule) -> SparseCells:
        """The builder's record of its new schedule: the arrays become read-only, so that it stays true."""
        for a in cls._arrays(s):
            a.flags.writeable = False
        return cls.scan(s)

    def indexes(self, s: Schedule) -> bool:
        """Whether this record still describes the schedule's arrays: the same objects, never
        writable since."""
        return all(a is b and not a.flags.writeable for a, b in zip(self._arrays(s), self.arrays, strict=True))

    def memo(self, key: str, fn: Callable[[], T]) -> T:
        """fn(), kept with the record: for what follows from the (frozen) arrays alone, such as the
        copies' slot releases, which every profile of a sweep would otherwise derive again."""
        if key not in self.derived:
            value = fn()
            for a in value if isinstance(value, tuple) else (value,):
                if isinstance(a, np.ndarray):
                    a.flags.writeable = False          # shared by every caller from now on
            self.derived[key] = value
        return self.derived[key]


def byte_cells(a: np.ndarray, value: int | None = None) -> np.ndarray:
    """Flat indices (ascending) of the cells of a one-byte array (int8, bool) that are nonzero, or
    equal to `value`. A plain scan costs about 0.4 ns a cell; schedules mark few cells, so 8 cells
    are tested per uint64 word first and only the words that may hold one are looked at."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    head = flat.size - flat.size % 8
    words = flat[:head].view(np.uint64)
    if value is not None:          # a byte equal to value != 0 shares a set bit with it
        words = words & np.uint64(int.from_bytes(bytes([value]) * 8, "little"))
    hot = np.flatnonzero(words != 0)
    if 4 * hot.size > words.size:                          # not sparse: the plain scan is cheaper
        return np.flatnonzero(flat != 0 if value is None else flat == value)
    found = flat[:head].view(np.uint64)[hot].view(np.uint8)     # the hot words' 8 cells each
    k = np.flatnonzero(found != 0 if value is None else found == value)
    out = hot[k >> 3] * 8 + (k & 7)
    if head == flat.size:
        return out
    rest = flat[head:]
    return np.concatenate([out, head + np.flatnonzero(rest != 0 if value is None else rest == value)])


def schedule_problems(schedule: Schedule, workload: Workload) -> list[str]:
    """Every broken invariant (first first): losslessness, residency and budget."""
    out: list[str] = []
    f, l, e = workload.expert_tokens.shape
    for name in ("placement", "copy", "demote", "resident"):
        if getattr(schedule, name).shape != (f, l, e):
            return [f"{name} has shape {getattr(schedule, name).shape}, expected {(f, l, e)}"]
    if schedule.initial_resident.shape != (l, e) or schedule.budget.shape != (l,):
        return ["initial_resident must be [L, E] and budget [L]"]
    activated = workload.expert_tokens > 0
    if not np.array_equal(schedule.placement != IDLE, activated):
        return ["lossless: every expert with routed tokens must run exactly once (GPU or CPU), "
                "and no idle expert may run"]
    before = schedule.resident_before()
    loaded_now = (schedule.copy == COPY_ON_DEMAND) | (schedule.copy == COPY_SYNC_REFRESH)
    usable = before | loaded_now
    if (schedule.on_gpu() & ~usable).any():
        fw, layer, ex = np.argwhere(schedule.on_gpu() & ~usable)[0]
        out.append(f"forward {fw} layer {layer} expert {ex}: runs on the GPU without being resident")
    if ((schedule.copy == COPY_ON_DEMAND) & ~schedule.on_gpu()).any():
        out.append("an on-demand copy must be followed by a GPU run of that expert")
    if (schedule.copied_in() & before & ~schedule.demote).any():
        out.append("an expert already resident is copied again")
    appeared = schedule.resident & ~before
    if (appeared & ~schedule.copied_in()).any():
        out.append("an expert became resident without a copy")
    if (schedule.demote & ~before).any():
        out.append("a demoted expert was not resident")
    counts = schedule.resident.sum(axis=2)
    if (counts > schedule.budget[None, :]).any():
        fw, layer = np.argwhere(counts > schedule.budget[None, :])[0]
        out.append(f"forward {fw} layer {layer}: {counts[fw, layer]} resident experts exceed the budget "
                   f"{schedule.budget[layer]}")
    if (schedule.initial_resident.sum(axis=1) > schedule.budget).any():
        out.append("the initial resident set exceeds the budget")
    return out
