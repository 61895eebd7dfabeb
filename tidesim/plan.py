"""Plan: the per-layer refresh intervals and GPU expert budgets the planner chose, as a JSON file.

A plan is only valid for the model, hardware profile and trace it was made from, so it carries
their fingerprints (sha256) and the memory it was sized for; loading it checks every field, so a
hand-edited or truncated file fails with one clear line instead of a wrong simulation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.atomic import write_text
from tidesim.errors import InputError, read_input_text
from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec

PLAN_FORMAT = "tidesim.plan"
PLAN_VERSION = 1
MODES = ("per-layer", "global-tau")
STATUSES = ("optimal", "feasible", "not-solved", "infeasible")


def plan_slots(plan: Plan) -> str:
    """The one way every command states a plan's GPU expert slots: used by its budgets, out of what
    its memory budget holds (the two differ when no candidate budget fills the last few slots)."""
    return f"{sum(plan.budget)} of {plan.expert_slots} expert slots"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (the trace a plan was made from)."""
    return sha256_bytes(Path(path).read_bytes())


def model_fingerprint(model: ModelSpec) -> str:
    """sha256 of the model spec as canonical JSON, so equal specs agree whatever their source."""
    return sha256_bytes(json.dumps(model.to_dict(), sort_keys=True).encode())


def profile_fingerprint(profile: HardwareProfile) -> str:
    """sha256 of the profile's canonical form (the same for a preset name and its file)."""
    return profile.fingerprint()


@dataclass
class Fingerprints:
    trace_sha256: str
    profile_sha256: str
    model_sha256: str


@dataclass
class SolverInfo:
    """What the solver reported. wall_time_s is measured, the one field that varies between runs."""

    solver: str
    status: str
    proven_optimal: bool
    wall_time_s: float
    time_limit_s: float | None
    milp_bound_s: float          # lower bound on the MILP optimum (the objective when proven optimal)


@dataclass
class Evaluation:
    """Predicted time of the plan and of the best single-tau tide on one set of prompts."""

    prompts: list[int]
    engine: str
    generated_tokens: int
    plan_time_s: float
    plan_tokens_per_s: float
    best_single_tau: int
    best_single_tau_budget: int
    best_single_tau_time_s: float
    best_single_tau_tokens_per_s: float
    speedup: float               # plan over best single tau (tokens/s ratio)


@dataclass
class CandidateTime:
    """One plan the planner considered and its time on the evaluation prompts."""

    name: str                    # "optimum", "intervals" (per-layer tau, uniform budget) or "tau N"
    time_s: float


@dataclass
class Selection:
    """How the kept plan was chosen: every candidate run by one executor on the evaluation prompts,
    the fastest kept (docs/planner.md, "Choosing the plan")."""

    prompts: list[int]
    engine: str
    chosen: str
    candidates: list[CandidateTime]


@dataclass
class Plan:
    """Per-layer tau and budget plus everything needed to trust and reproduce it."""

    model: str
    hw: str
    trace: str
    mode: str
    gpu_mem_gib: float
    expert_slots: int            # slots the memory budget holds over all MoE layers
    tau: list[int]
    budget: list[int]
    objective_s: float           # predicted total time on the calibration prompts
    oracle_bound_s: float | None
    gap: float | None            # objective / oracle bound - 1
    solver: SolverInfo
    fingerprints: Fingerprints
    taus: list[int]
    budgets: list[int]
    refresh: str = "sync"
    calibration: Evaluation | None = None
    heldout: Evaluation | None = None
    notes: list[str] = field(default_factory=list)
    policy: str = "tide"         # the policy the plan's tau and budgets are for
    selection: Selection | None = None
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.tau)

    def tau_array(self) -> np.ndarray:
        return np.asarray(self.tau, dtype=np.int64)

    def budget_array(self) -> np.ndarray:
        return np.asarray(self.budget, dtype=np.int64)

    def memory_bytes(self, model: ModelSpec) -> float:
        """GPU bytes the plan keeps resident: experts, non-expert weights (reserve excluded)."""
        return float(sum(self.budget) * model.expert_bytes + model.non_expert_bytes)

    # ----- checks ------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every inconsistency, first one first (empty when valid)."""
        out: list[str] = []
        if self.format != PLAN_FORMAT:
            out.append(f"format must be {PLAN_FORMAT!r}, got {self.format!r}")
        if self.version != PLAN_VERSION:
            out.append(f"version {self.version} is not supported (this tidesim reads {PLAN_VERSION})")
        if self.mode not in MODES:
            out.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.tau or len(self.tau) != len(self.budget):
            out.append("tau and budget must give one value per MoE layer, of equal length")
        if any(not _is_int(t) or t < 1 for t in self.tau):
            out.append("every tau must be an integer >= 1")
        if any(not _is_int(b) or b < 0 for b in self.budget):
            out.append("every budget must be an integer >= 0")
        if self.mode == "global-tau" and len(set(self.tau)) > 1:
            out.append("a global-tau plan must use one tau for every layer")
        if _is_int(self.expert_slots) and all(_is_int(b) for b in self.budget) \
                and sum(self.budget) > self.expert_slots:
            out.append(f"the budgets use {sum(self.budget)} expert slots, more than the {self.expert_slots} "
                       "the memory budget holds")
        if not isinstance(self.gpu_mem_gib, int | float) or self.gpu_mem_gib <= 0:
            out.append("gpu_mem_gib must be a positive number")
        if not isinstance(self.objective_s, int | float) or not self.objective_s >= 0:
            out.append("objective_s must be a number >= 0")
        if self.solver.status not in STATUSES:
            out.append(f"solver status must be one of {', '.join(STATUSES)}")
        if self.refresh not in ("sync", "async"):
            out.append("refresh must be sync or async")
        if not isinstance(self.policy, str) or not self.policy:
            out.append("policy must name the policy the plan is for, e.g. tide")
        if self.selection is not None and self.selection.chosen not in {c.name for c in self.selection.candidates}:
            out.append(f"selection.chosen {self.selection.chosen!r} is not among its candidates")
        for name in ("trace_sha256", "profile_sha256", "model_sha256"):
            value = getattr(self.fingerprints, name)
            if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
                out.append(f"fingerprints.{name} must be a sha256 hex digest")
            elif len(set(value)) == 1:
                out.append(f"fingerprints.{name} is a placeholder ({value[:8]}...), not the digest of a real "
                           "input; make the plan with `tidesim plan`")
        return out

    def check_model(self, model: ModelSpec) -> None:
        """Refuse to run a plan on a model it was not made for, naming what differs."""
        if model_fingerprint(model) != self.fingerprints.model_sha256 or model.num_moe_layers != self.num_layers:
            raise InputError(f"the plan was made for model {self.model!r}, not for this trace's: "
                             f"{self.model_difference(model)}; make a plan with `tidesim plan` for this trace")
        if any(b > model.num_experts for b in self.budget):
            raise InputError(f"the plan's budgets exceed the model's {model.num_experts} experts per layer")

    def model_difference(self, model: ModelSpec) -> str:
        """What differs between the model the plan was made for and `model`, in words."""
        if model.name != self.model:
            return f"the trace's model is {model.name!r} ({model.num_moe_layers} MoE layers, the plan has " \
                   f"{self.num_layers})"
        if model.num_moe_layers != self.num_layers:
            return f"the plan has {self.num_layers} MoE layers, the model {model.num_moe_layers}"
        from tidesim.models import PRESETS

        preset = PRESETS.get(self.model)
        if preset is not None and model_fingerprint(preset) == self.fingerprints.model_sha256:
            theirs, ours = preset.to_dict(), model.to_dict()
            changed = [k for k in sorted(ours) if theirs.get(k) != ours[k]]
            return "same name, but " + ", ".join(f"{k} is {ours[k]!r} (the plan's: {theirs.get(k)!r})"
                                                 for k in changed[:3])
        return (f"same name and {model.num_moe_layers} MoE layers, but another model spec (sha256 "
                f"{model_fingerprint(model)[:12]}, the plan's {self.fingerprints.model_sha256[:12]})")

    def input_differences(self, trace_path: str | Path, hw: HardwareProfile) -> list[str]:
        """The inputs this plan is used on that differ from those it was made from (trace file bytes,
        hardware profile), each in words; empty when they are the same."""
        out = []
        trace_sha = file_fingerprint(trace_path)
        if trace_sha != self.fingerprints.trace_sha256:
            out.append(f"the plan was made from trace {self.trace!r} (sha256 {self.fingerprints.trace_sha256[:12]}), "
                       f"not from {str(trace_path)!r} (sha256 {trace_sha[:12]})")
        hw_sha = profile_fingerprint(hw)
        if hw_sha != self.fingerprints.profile_sha256:
            what = "another version of it" if hw.name == self.hw else repr(hw.name)
            out.append(f"the plan was made for hardware profile {self.hw!r} (sha256 "
                       f"{self.fingerprints.profile_sha256[:12]}), not {what} (sha256 {hw_sha[:12]})")
        return out

    def check_inputs(self, model: ModelSpec, trace_path: str | Path, hw: HardwareProfile, force: bool = False
                     ) -> list[str]:
        """Refuse a plan used on another model (always), trace or profile (unless `force`); returns the
        warnings to show when forced."""
        self.check_model(model)
        differences = self.input_differences(trace_path, hw)
        if differences and not force:
            raise InputError(f"{differences[0]}; make a plan for these inputs with `tidesim plan`, or pass --force "
                             "to use it anyway")
        return differences

    # ----- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def digest(self) -> str:
        """sha256 of the plan's canonical JSON: its content, for the keys of a scenario and a schedule."""
        return sha256_bytes(self.to_json().encode())

    def save(self, path: str | Path) -> None:
        """Validate, then write atomically (nothing half-written on error)."""
        problems = self.problems()
        if problems:
            raise InputError(f"refusing to write an invalid plan: {problems[0]}")
        write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object")
        if data.get("format") != PLAN_FORMAT:
            raise InputError(f"{source}: not a tidesim plan (format {data.get('format')!r}); "
                             "make one with `tidesim plan`")
        try:
            values = _fields(cls, data, source)
            values["solver"] = SolverInfo(**_fields(SolverInfo, data["solver"], f"{source}.solver"))
            values["fingerprints"] = Fingerprints(**_fields(Fingerprints, data["fingerprints"],
                                                             f"{source}.fingerprints"))
            for key in ("calibration", "heldout"):
                if values.get(key) is not None:
                    values[key] = Evaluation(**_fields(Evaluation, values[key], f"{source}.{key}"))
            if values.get("selection") is not None:
                values["selection"] = _selection(values["selection"], f"{source}.selection")
            plan = cls(**values)
        except (TypeError, KeyError) as exc:
            raise InputError(f"{source}: malformed plan ({exc})") from None
        problems = plan.problems()
        if problems:
            raise InputError(f"{source}: {problems[0]}")
        return plan


def _selection(data: Any, where: str) -> Selection:
    values = _fields(Selection, data, where)
    if not isinstance(values["candidates"], list):
        raise InputError(f"{where}.candidates: expected a list")
    values["candidates"] = [CandidateTime(**_fields(CandidateTime, c, f"{where}.candidates[{i}]"))
                            for i, c in enumerate(values["candidates"])]
    return Selection(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The mapping's values for the dataclass's fields; unknown or missing required ones are errors."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}")
    required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise InputError(f"{where}: field {missing[0]!r} is missing")
    return dict(data)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; every problem is an InputError naming the file."""
    path = Path(path)
    text = read_input_text(path, "plan file", "make one with `tidesim plan`")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return Plan.from_dict(data, source=str(path))
