"""The decode flags shared by every command that decodes or describes a decode (one definition,
one validation).

The flags and their defaults are those of the official LLaDA2.0 `generate` (block length 32,
32 steps, threshold 0.95, temperature 0, no top-k / top-p, argmax unless --do-sample,
minimal_topk 1, no EOS early stop) plus this project's --kv-cache and --seed. `check_decode`
is the one place their values are checked; `tidesim_runtime.reference.generate.DecodeConfig` calls it
too, so a library caller and a command line get the same one-line refusals. Imports no torch.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from tidesim.errors import InputError

KV_MODES = ("none", "prefix")


@dataclass(frozen=True)
class DecodeDefaults:
    """Defaults a command may change (e.g. trace synth's gen length); the rest are official."""

    gen_length: int = 256
    block_length: int = 32
    steps: int = 32
    threshold: float = 0.95
    kv_cache: str = "none"


def add_decode_args(parser: argparse.ArgumentParser, defaults: DecodeDefaults = DecodeDefaults(),
                    sampling: bool = True) -> None:
    """Add the decode flags to `parser`; `sampling` False leaves out the token-sampling flags
    (for commands that describe a decode without running a model)."""
    g = parser.add_argument_group("decoding (official LLaDA2.0 generate rules; docs/capture.md)")
    g.add_argument("--gen-length", type=int, default=defaults.gen_length, metavar="G",
                   help=f"tokens to generate (default {defaults.gen_length})")
    g.add_argument("--block-length", type=int, default=defaults.block_length, metavar="L",
                   help=f"block length (default {defaults.block_length})")
    g.add_argument("--steps", type=int, default=defaults.steps, metavar="S",
                   help=f"denoising steps per block at most; the per-step quota is L/S (default {defaults.steps})")
    g.add_argument("--threshold", type=float, default=defaults.threshold,
                   help=f"commit confidence threshold in (0, 1] (default {defaults.threshold})")
    g.add_argument("--minimal-topk", type=int, default=1, metavar="K",
                   help="cap steps at gen_length // K, as the official generate does (default 1)")
    g.add_argument("--eos-early-stop", action="store_true",
                   help="stop right after the step that commits an EOS with nothing masked before it")
    g.add_argument("--kv-cache", choices=KV_MODES, default=defaults.kv_cache,
                   help="none: recompute the prefix every step (official code, TIDE); prefix: cache it per "
                        f"block (dInfer / Fast-dLLM) (default {defaults.kv_cache})")
    if sampling:
        g.add_argument("--temperature", type=float, default=0.0,
                       help="divide logits by T unless T is 0 or 1 (default 0)")
        g.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K best logits (default: all)")
        g.add_argument("--top-p", type=float, default=None, metavar="P",
                       help="nucleus filter: keep the best tokens up to probability P (default: all)")
        g.add_argument("--do-sample", action="store_true",
                       help="draw tokens from the distribution (seeded by --seed) instead of the argmax")


def decode_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The DecodeConfig keyword arguments given by the flags (checked; InputError on bad values)."""
    kw: dict[str, Any] = {
        "gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps,
        "threshold": args.threshold, "minimal_topk": args.minimal_topk, "eos_early_stop": args.eos_early_stop,
        "kv_cache": args.kv_cache,
    }
    for name in ("temperature", "top_k", "top_p", "do_sample"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    if hasattr(args, "seed"):
        kw["seed"] = args.seed
    check_decode(**kw, flags=True)
    return kw


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


def effective_steps(gen_length: int, steps: int, minimal_topk: int) -> int:
    """Denoising steps per block at most: the official cap min(steps, gen_length // minimal_topk)."""
    return min(steps, gen_length // minimal_topk)


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens to commit at each step of a block (the official quota): block_length // steps,
    plus one for the first block_length % steps steps. E.g. (32, 5) -> [7, 7, 6, 6, 6]."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def layout(prompt_len: int, gen_length: int, block_length: int) -> tuple[int, int]:
    """(first decoded block, number of blocks) of the official absolute-block layout:
    blocks of block_length from position 0, ceil((P + G) / L) of them; decoding starts at P // L."""
    return prompt_len // block_length, -(-(prompt_len + gen_length) // block_length)
