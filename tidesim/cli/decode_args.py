"""The decode flags shared by every command that decodes or describes a decode (one definition,
one validation).

The flags and their defaults are those of the official LLaDA2.0 `generate` (block length 32,
32 steps, threshold 0.95, temperature 0, no top-k / top-p, argmax unless --do-sample,
minimal_topk 1, no EOS early stop) plus this project's --kv-cache and --seed. Their values are
checked by tidesim.decode.check_decode, the one place the decode rules live; the reference
model's DecodeConfig calls it too, so a library caller and a command line get the same one-line
refusals. Imports no torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from tidesim.decode import KV_MODES, check_decode


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
