"""The official LLaDA2.0 decode rules, written once: which decode settings are valid (check_decode),
how many denoising steps a block runs at most (effective_steps), how many positions each step
commits (transfer_schedule) and where blocks lie (layout).

The rules are those of the official LLaDA2.0 `generate` (block length 32, 32 steps, threshold
0.95, temperature 0, no top-k / top-p, argmax unless do_sample, minimal_topk 1, no EOS early
stop) plus this project's kv_cache and seed. The command-line flags (tidesim.cli.decode_args),
the trace synthesizer and layout checks (tidesim.trace) and the reference model's decoder
(tidesim_runtime.reference.generate) all call these. Imports no torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tidesim.errors import InputError

KV_MODES = ("none", "prefix")


def _int(name: str, value: Any, low: int, flags: bool) -> None:
    label = "--" + name.replace("_", "-") if flags else name
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{label} must be an integer >= {low}, got {value!r}")


def _real(name: str, value: Any, flags: bool) -> float:
    label = "--" + name.replace("_", "-") if flags else name
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise InputError(f"{label} must be a finite number, got {value!r}")
    return float(value)


def check_decode(gen_length: int, block_length: int = 32, steps: int = 32, threshold: float = 0.95,
                 minimal_topk: int = 1, eos_early_stop: bool = False, kv_cache: str = "none",
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 do_sample: bool = False, seed: int = 0, flags: bool = False) -> None:
    """Refuse values the decoding rules cannot take (InputError, one line naming the flag).

    `flags` True names them as command-line flags (--gen-length), else as fields (gen_length).
    """
    def label(name: str) -> str:
        return "--" + name.replace("_", "-") if flags else name

    _int("gen_length", gen_length, 1, flags)
    _int("block_length", block_length, 1, flags)
    _int("steps", steps, 1, flags)
    _int("minimal_topk", minimal_topk, 1, flags)
    if minimal_topk > gen_length:
        raise InputError(f"{label('minimal_topk')} {minimal_topk} exceeds {label('gen_length')} {gen_length}: the "
                         "official rule caps steps at gen_length // minimal_topk = 0, so nothing would be decoded")
    t = _real("threshold", threshold, flags)
    if not 0 < t <= 1:
        raise InputError(f"{label('threshold')} must lie in (0, 1], got {threshold!r}")
    temp = _real("temperature", temperature, flags)
    if temp < 0:
        raise InputError(f"{label('temperature')} must be >= 0, got {temperature!r}")
    if top_k is not None:
        _int("top_k", top_k, 0, flags)
    if top_p is not None:
        p = _real("top_p", top_p, flags)
        if not 0 <= p <= 1:
            raise InputError(f"{label('top_p')} must lie in [0, 1], got {top_p!r}")
    if kv_cache not in KV_MODES:
        raise InputError(f"{label('kv_cache')} must be one of {', '.join(KV_MODES)}, got {kv_cache!r}")
    for name, value in (("do_sample", do_sample), ("eos_early_stop", eos_early_stop)):
        if not isinstance(value, bool):
            raise InputError(f"{label(name)} must be true or false, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"{label('seed')} must be an integer >= 0, got {seed!r}")


def effective_steps(steps: int, gen_length: int, minimal_topk: int = 1) -> int:
    """Denoising steps per block at most: the official cap min(steps, gen_length // minimal_topk)."""
    return min(steps, gen_length // minimal_topk)


def transfer_schedule(block_length: int, steps: int) -> np.ndarray:
    """Tokens to commit at each step of a block (the official quota), int64 [steps]:
    block_length // steps, plus one for the first block_length % steps steps.
    E.g. (32, 5) -> [7, 7, 6, 6, 6]."""
    quota = np.full(steps, block_length // steps if steps else 0, dtype=np.int64)
    quota[: block_length % steps if steps else 0] += 1
    return quota


def layout(prompt_len: int, gen_length: int, block_length: int) -> tuple[int, int]:
    """(first decoded block, number of blocks) of the official absolute-block layout:
    blocks of block_length from position 0, ceil((P + G) / L) of them; decoding starts at P // L."""
    return prompt_len // block_length, -(-(prompt_len + gen_length) // block_length)
