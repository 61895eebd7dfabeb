"""The online policy step: one policy logic for the offline Schedule builder and the live engine.

A policy is a PolicyStep: it holds its state (the resident set, LRU stamps, ...) and decides one
forward at a time from that forward's routing (tokens per expert, known once the router has run,
before the experts run) and its metadata (prompt, block, step, phase). Online routing arrives
layer by layer (layer l+1's routing depends on layer l's output), so `step` takes any subset of
the MoE layers; every policy here decides each layer from that layer's state and routing alone,
so one call for all layers and one call per layer give the same decisions.

The offline builder (tidesim.policies.build_schedule) is `step` looped over the forwards of a
trace with all layers at once (offline_schedule); the live engine (tidesim_runtime.measure.deploy) calls
it layer by layer while the model decodes. Bounds (oracle) need the future and have no step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.policies.options import PolicyOptions
from tidesim.policies.residency import checked_static_set, commit_forwards, static_set
from tidesim.schedule import CPU, GPU, IDLE, NO_COPY, Schedule, SparseCells
from tidesim.workload import Workload

PHASES = ("prefill", "step", "commit")


@dataclass(frozen=True)
class ForwardMeta:
    """What a policy knows about a forward before its experts run.

    index: the forward's ordinal in the run (0, 1, ...; the LRU clock). block -1 is the prefill;
    phase is "prefill", "step" (a denoising step) or "commit" (a finished block written into the
    prefix cache).
    """

    index: int
    prompt: int
    block: int
    step: int
    phase: str

    @property
    def first_block(self) -> bool:
        """A forward of the first generated block of its prompt (the prefill included)."""
        return self.block <= 0

    @property
    def is_commit(self) -> bool:
        return self.phase == "commit"


Rows = slice | np.ndarray
"""Selected MoE layers: a slice when they are contiguous (cheap views), else an index array."""

Choice = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""What a policy decides for the selected layers: (placement, copy, demote, resident)."""


@dataclass(slots=True)
class Decision:
    """One forward's decisions for the MoE layers `layers`: arrays [len(layers), E] with the
    Schedule's encoding (tidesim.schedule). `rows` selects those layers (a slice when contiguous)."""

    layers: np.ndarray      # int64 [n]
    rows: Rows
    placement: np.ndarray   # int8: idle, GPU, CPU
    copy: np.ndarray        # int8: NO_COPY, on demand, sync refresh, async refresh
    demote: np.ndarray      # bool: D2H demotion
    resident: np.ndarray    # bool: resident at the end of the forward


@dataclass
class Setup:
    """What a policy is built from: the model, the options, and (offline only) the workload, from
    which static policies may take a warm-up prefix when no static set is given."""

    model: ModelSpec
    layers: int
    experts: int
    options: PolicyOptions
    workload: Workload | None = None


class PolicyStep:
    """Base of every online policy: the budget, the initial resident set and the current one.

    Subclasses implement `decide`; `step` checks the call and advances the resident set.
    """

    name = ""
    is_bound = False

    def __init__(self, setup: Setup, initial: np.ndarray | None = None) -> None:
        self.setup = setup
        self.budget = np.asarray(setup.options.budget, dtype=np.int64)
        shape = (setup.layers, setup.experts)
        self.initial = np.zeros(shape, dtype=bool) if initial is None else np.asarray(initial, dtype=bool).copy()
        self.current = self.initial.copy()
        self.feasible = True
        self._all = np.arange(setup.layers, dtype=np.int64)
        self._all_rows = as_rows(self._all)
        self._experts = setup.experts

    def step(self, meta: ForwardMeta, counts: np.ndarray, layers: np.ndarray | None = None) -> Decision:
        """Decide forward `meta` for `layers` (default all, in any order) from their routing,
        counts [len(layers), E]."""
        if layers is None:
            index, rows = self._all, self._all_rows
        else:
            index = layers if type(layers) is np.ndarray and layers.dtype == np.int64 else np.asarray(layers, np.int64)
            rows = as_rows(index)
            if not self._in_range(index, rows):
                raise InputError(f"MoE layers must lie in 0..{self.setup.layers - 1}, got {index.tolist()}")
        counts = np.asarray(counts)
        if counts.shape != (index.size, self._experts):
            raise InputError(f"routing counts must have shape {(index.size, self._experts)}, got {counts.shape}")
        placement, copy, demote, resident = self.decide(meta, rows, counts)
        self.current[rows] = resident
        return Decision(index, rows, placement, copy, demote, resident)

    def _in_range(self, index: np.ndarray, rows: Rows) -> bool:
        if isinstance(rows, slice):  # contiguous ascending: its ends bound it
            return bool(rows.start >= 0 and rows.stop <= self.setup.layers)
        return bool(index.size == 0 or (index.min() >= 0 and index.max() < self.setup.layers))

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        """(placement, copy, demote, resident) for the layers `rows`; must not change
        self.current (step does) and must return fresh arrays, not views of the state."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Schedule.params of the run (JSON-friendly)."""
        return {}

    def finish(self, schedule: Schedule) -> Schedule:
        """Last touches on an assembled Schedule (planned renames itself); default none."""
        return schedule


def static_for(setup: Setup, size: np.ndarray, policy: str) -> np.ndarray:
    """The static resident set of cpu-routing and fiddler. Offline, without a given set, it is the
    popular set of the trace's warm-up prefix (a profiling run made before deployment). Online
    there is no trace yet, so the set must be given up front (options.static_resident: the
    popular set of an earlier trace or run of the same model, `tidesim generate --static-from`)."""
    options = setup.options
    if setup.workload is not None:
        return static_set(setup.workload, options.static_resident, size, options.warmup_fraction)
    if options.static_resident is None:
        raise InputError(f"{policy} keeps a static GPU set chosen from a warm-up run; online that set must be given "
                         "up front: pass --static-from with a trace or an earlier run of the same model")
    return checked_static_set(options.static_resident, (setup.layers, setup.experts), size)


def as_rows(index: np.ndarray) -> Rows:
    """A slice for contiguous ascending layers (views instead of copies), else the index."""
    if index.size == 1:  # one layer (the live engine's call)
        i = int(index[0])
        return slice(i, i + 1)
    if index.size and int(index[-1]) - int(index[0]) == index.size - 1 and (
            index.size == 1 or bool((np.diff(index) == 1).all())):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


assert (IDLE, GPU, CPU) == (0, 1, 2) and NO_COPY == 0  # the encodings the helpers below compute with


def placement_of(counts: np.ndarray, gpu: np.ndarray, activated: np.ndarray | None = None) -> np.ndarray:
    """int8 placement of one decision: activated experts (counts > 0, or `activated` when the
    caller has it) on the GPU where `gpu`, else the CPU (idle = 0, GPU = 1, CPU = 2, so
    placement = activated x (2 - gpu))."""
    act = counts > 0 if activated is None else activated
    return act.view(np.int8) * cpu_code(gpu)


def cpu_code(gpu: np.ndarray) -> np.ndarray:
    """int8 2 - gpu: the placement of an activated expert, GPU (1) where `gpu`, else CPU (2). A
    policy whose GPU set is fixed keeps it as a constant (placement = activated x code)."""
    return 2 - gpu.view(np.int8)


def no_copies(counts: np.ndarray) -> np.ndarray:
    return np.zeros(counts.shape, dtype=np.int8)  # NO_COPY is 0


def copies(mask: np.ndarray, code: int) -> np.ndarray:
    """int8 copy array: `code` where `mask`, NO_COPY (0) elsewhere."""
    return mask.view(np.int8) * np.int8(code)


def forward_metas(workload: Workload) -> list[ForwardMeta]:
    """The metadata of every forward of a workload. The Workload has no phase column: a commit
    forward is a forward of a generated block that commits no token (every denoising step commits
    at least one; see residency.commit_forwards), and block -1 is the prefill."""
    commit = commit_forwards(workload)
    phase = np.where(commit, "commit", np.where(workload.block < 0, "prefill", "step"))
    return [ForwardMeta(index=f, prompt=int(p), block=int(b), step=int(s), phase=str(ph))
            for f, (p, b, s, ph) in enumerate(zip(workload.prompt.tolist(), workload.block.tolist(),
                                                  workload.step.tolist(), phase.tolist(), strict=True))]


@dataclass
class ScheduleRecorder:
    """Collects decisions forward by forward (all layers, or layer by layer) into Schedule arrays."""

    layers: int
    experts: int
    placement: list[np.ndarray] = field(default_factory=list)
    copy: list[np.ndarray] = field(default_factory=list)
    demote: list[np.ndarray] = field(default_factory=list)
    resident: list[np.ndarray] = field(default_factory=list)
    _seen: np.ndarray | None = None

    def begin_forward(self) -> None:
        shape = (self.layers, self.experts)
        self.placement.append(np.zeros(shape, dtype=np.int8))
        self.copy.append(np.zeros(shape, dtype=np.int8))
        self.demote.append(np.zeros(shape, dtype=bool))
        self.resident.append(np.zeros(shape, dtype=bool))
        self._seen = np.zeros(self.layers, dtype=bool)

    def add(self, d: Decision) -> None:
        if self._seen is None:
            raise RuntimeError("begin_forward() first")
        if self._seen[d.layers].any():
            raise RuntimeError(f"MoE layer {int(d.layers[self._seen[d.layers]][0])} decided twice in one forward")
        self._seen[d.rows] = True
        self.placement[-1][d.rows] = d.placement
        self.copy[-1][d.rows] = d.copy
        self.demote[-1][d.rows] = d.demote
        self.resident[-1][d.rows] = d.resident

    def complete(self) -> bool:
        return self._seen is not None and bool(self._seen.all())

    def schedule(self, policy: PolicyStep) -> Schedule:
        """The Schedule of every forward recorded so far."""
        shape = (0, self.layers, self.experts)
        stack = lambda xs, dt: np.stack(xs) if xs else np.zeros(shape, dtype=dt)  # noqa: E731
        return assembled(policy, stack(self.placement, np.int8), stack(self.copy, np.int8), stack(self.demote, bool),
                         stack(self.resident, bool))


def assembled(policy: PolicyStep, placement: np.ndarray, copy: np.ndarray, demote: np.ndarray,
              resident: np.ndarray) -> Schedule:
    """The policy's Schedule from its [F, L, E] decisions, with the builder's sparse record."""
    out = Schedule(
        policy=policy.name, budget=policy.budget.copy(), initial_resident=policy.initial.copy(),
        placement=placement, copy=copy, demote=demote, resident=resident,
        params=policy.params(), is_bound=policy.is_bound, feasible=policy.feasible,
    )
    out.cells = SparseCells.of(out)
    return policy.finish(out)


def offline_schedule(policy: PolicyStep, workload: Workload) -> Schedule:
    """The policy's step looped over every forward of the workload, all layers at once (what a
    ScheduleRecorder collects, written straight into the [F, L, E] arrays)."""
    counts = workload.expert_tokens
    placement, copy = np.zeros(counts.shape, np.int8), np.zeros(counts.shape, np.int8)
    demote, resident = np.zeros(counts.shape, bool), np.zeros(counts.shape, bool)
    for meta in forward_metas(workload):
        d = policy.step(meta, counts[meta.index])
        f = meta.index
        placement[f], copy[f], demote[f], resident[f] = d.placement, d.copy, d.demote, d.resident
    return assembled(policy, placement, copy, demote, resident)


def layered_schedule(policy: PolicyStep, workload: Workload) -> Schedule:
    """The policy's step looped the live engine's way: one call per (forward, layer), in layer
    order, recorded by a ScheduleRecorder (an online policy decides the same either way: the
    tests and bench/check_online_identity.py compare this with offline_schedule)."""
    rec = ScheduleRecorder(workload.num_layers, workload.num_experts)
    for meta in forward_metas(workload):
        rec.begin_forward()
        for layer in range(workload.num_layers):
            rec.add(policy.step(meta, workload.expert_tokens[meta.index, layer][None], np.array([layer])))
        if not rec.complete():
            raise RuntimeError(f"forward {meta.index}: the recorder did not see every layer")
    return rec.schedule(policy)
