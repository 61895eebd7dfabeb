"""Documented limits on input sizes, and the memory estimate checked before big work starts.

Absurd sizes are refused in one line before any work, either because they exceed a documented
limit (docs/limits.md) or because the estimated memory of the work does not fit in what this
machine has available now. The limits sit far above every published setting (LLaDA2.0 decodes
with gen length 256..1024 and block length 32; TIDE's scripts use 4..8 prompts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tidesim.errors import InputError
from tidesim.models import ModelSpec

MAX_PROMPTS = 10_000                 # prompts of one synthesized trace
MAX_GEN_LENGTH = 65_536              # generated tokens per prompt
MAX_PROMPT_LENGTH = 131_072          # prompt tokens (a 128k context)
MAX_BLOCK_LENGTH = 4_096             # tokens per diffusion block
MAX_TRACE_FORWARDS = 2_000_000       # forwards of one synthesized trace (estimated)
MAX_SWEEP_POINTS = 100_000           # points of one sweep grid
MEMORY_SHARE = 0.8                   # at most this share of the available memory is planned for
TYPICAL_TOKENS_PER_STEP = 2.5        # LLaDA2.0 at threshold 0.95 (docs/traces.md); sizes the estimate


@dataclass(frozen=True)
class Estimate:
    """What a piece of work will hold: forwards and bytes of memory at its peak (an estimate)."""

    forwards: int
    bytes: int


def available_memory_bytes() -> int | None:
    """Memory this machine can give now (MemAvailable on Linux), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_memory(need: int, what: str, hint: str, available: int | None = None) -> None:
    """Refuse work whose estimated memory exceeds MEMORY_SHARE of what is available."""
    free = available_memory_bytes() if available is None else available
    if free is not None and need > MEMORY_SHARE * free:
        raise InputError(f"{what} needs about {human_bytes(need)} of memory, more than this machine has "
                         f"available ({human_bytes(free)}); {hint}")


def check_limit(value: int, limit: int, name: str) -> None:
    if value > limit:
        raise InputError(f"{name} {value:,} exceeds the limit of {limit:,} (docs/limits.md)")


def synth_estimate(model: ModelSpec, prompts: int, gen_length: int, block_length: int, prompt_length: int,
                   kv_cache: str, token_level: bool = False) -> Estimate:
    """Forwards and peak memory of synthesizing a trace: per-forward expert counts (kept as int64
    while decoding, then an int32 array and its Arrow table), the float32 routing arrays of one
    block or prompt, and the token-level ids and weights when kept."""
    layers, experts, k = model.num_moe_layers, model.num_experts, model.top_k
    blocks = max(gen_length // max(block_length, 1), 1)
    steps = max(1, min(block_length, round(block_length / TYPICAL_TOKENS_PER_STEP)))
    prefix = kv_cache == "prefix"
    per_prompt = blocks * (steps + prefix) + prefix
    forwards = prompts * per_prompt
    counts = forwards * layers * experts * (8 + 4 + 4)
    working = max(prompt_length, block_length) * layers * experts * 4 * 6
    tokens = 0
    if token_level:
        if prefix:
            tokens = prompts * (prompt_length + blocks * (steps + 1) * block_length)
        else:
            mean_context = prompt_length + block_length * (blocks + 1) / 2
            tokens = int(prompts * blocks * steps * mean_context)
    return Estimate(forwards=forwards, bytes=int(counts + working + tokens * layers * k * (2 + 4) * 2))


def check_synth(model: ModelSpec, prompts: int, gen_length: int, block_length: int, prompt_length: int,
                kv_cache: str, token_level: bool = False, available: int | None = None) -> Estimate:
    """Refuse, in one line, a synthesized trace beyond the documented limits or this machine's memory."""
    check_limit(prompts, MAX_PROMPTS, "prompts")
    check_limit(gen_length, MAX_GEN_LENGTH, "gen-length")
    check_limit(prompt_length, MAX_PROMPT_LENGTH, "prompt-length")
    check_limit(block_length, MAX_BLOCK_LENGTH, "block-length")
    est = synth_estimate(model, prompts, gen_length, block_length, prompt_length, kv_cache, token_level)
    check_limit(est.forwards, MAX_TRACE_FORWARDS, "the trace's estimated forwards")
    what = (f"synthesizing this trace (about {est.forwards:,} forwards; {model.num_moe_layers} MoE layers x "
            f"{model.num_experts} experts; prompts of {prompt_length:,} tokens)")
    check_memory(est.bytes, what, "use fewer prompts or shorter lengths", available)
    return est


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity set, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_tau(tau: int | None, flag: str = "--tau") -> None:
    """The one input check of a refresh interval (every command's --tau, plan's --taus grid, a
    policy's per-layer tau, the refresh mask): at least 1 (None: the default rule chooses)."""
    if tau is not None and tau < 1:
        raise InputError(f"{flag} must be at least 1, got {tau}")


def check_cpu_workers(workers: int | None, flag: str = "--cpu-workers") -> None:
    """A CPU worker pool of at least one worker and at most one per usable core (None: the default)."""
    if workers is None:
        return
    cores = usable_cores()
    if workers < 1:
        raise InputError(f"{flag} must be at least 1, got {workers}")
    if workers > cores:
        raise InputError(f"{flag} {workers} is more than the {cores} cores this machine lets tidesim use; "
                         f"give at most {cores}")
