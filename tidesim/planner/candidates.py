"""The candidate budgets and intervals the planner chooses from (the memory rule,
expert_slots, is tidesim.budget's)."""

from __future__ import annotations

from tidesim.budget import expert_slots
from tidesim.errors import InputError

__all__ = ["default_budgets", "expert_slots", "parse_int_list", "uniform_budget"]


def uniform_budget(slots: int, layers: int, experts: int) -> int:
    """The budget every layer gets when the slots are shared evenly (what the public code uses)."""
    return min(slots // layers, experts)


def default_budgets(slots: int, layers: int, experts: int) -> list[int]:
    """Candidate budgets: a grid around the uniform budget u from u/4 to 2u (within 1..experts),
    always containing u itself, so the uniform single-tau setting is a feasible point."""
    u = uniform_budget(slots, layers, experts)
    factors = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5, 1.75, 2.0)
    values = {min(max(round(u * f), 1), experts) for f in factors} | {u}
    return sorted(values)


MAX_LIST_VALUES = 10_000      # candidate intervals, budgets or prompt ids in one list (docs/limits.md)


def parse_int_list(text: str, name: str, allow_zero: bool = False) -> list[int]:
    """'1..32', '1,2,4,8' or '8..64:8' (start..stop:step) -> sorted unique positive integers
    (non-negative with allow_zero, for prompt ids)."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if ".." in part:
                rng, _, step = part.partition(":")
                lo, hi = (int(v) for v in rng.split(".."))
                values = range(lo, hi + 1, int(step) if step else 1)
                if len(values) > MAX_LIST_VALUES:
                    raise InputError(f"{name}: {part} gives {len(values):,} values, more than the limit of "
                                     f"{MAX_LIST_VALUES:,} (docs/limits.md)")
                out.update(values)
            elif part:
                out.add(int(part))
    except ValueError:
        raise InputError(f"{name} must be integers like 1..32, 4,8,16 or 8..96:8, got {text!r}") from None
    if not out or min(out) < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise InputError(f"{name} must be {kind} integers, got {text!r}")
    return sorted(out)
