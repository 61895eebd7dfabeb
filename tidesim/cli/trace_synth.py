"""`tidesim trace synth`: write a synthetic trace with the structure of block-diffusion routing."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tidesim.cli.output import format_table, print_json, progress
from tidesim.errors import InputError
from tidesim.limits import check_synth
from tidesim.models import get_model
from tidesim.trace.io import write_trace
from tidesim.trace.schema import DECODES
from tidesim.trace.synth import EOS_MODES, GENERATOR_VERSION, SynthConfig, synthesize
from tidesim.trace.synth_ar import ArConfig, synthesize_ar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="generate a synthetic trace (calibrated to published LLaDA2.0 routing statistics)",
        description="Generate a synthetic expert-activation trace of block-diffusion decoding. "
                    "The generator and its calibration are described in docs/traces.md.",
    )
    p.add_argument("--model", default="llada2-mini", help="model preset or config.json (default llada2-mini)")
    p.add_argument("--decode", choices=DECODES, default="diffusion",
                   help="diffusion: block-diffusion decoding (LLaDA2.0); autoregressive: a prefill, then one "
                        "forward per generated token (block length 1, KV cache; takes --prompts, --prompt-length "
                        "(default 128), --gen-length, --seed, --token-level) (diffusion)")
    p.add_argument("--prompts", type=int, default=4, help="number of prompts decoded one after another (4)")
    p.add_argument("--gen-length", type=int, default=256,
                   help="most tokens generated per prompt; answers end earlier at their EOS (256)")
    p.add_argument("--block-length", type=int, default=32, help="tokens per block (32)")
    p.add_argument("--threshold", type=float, default=0.95, help="confidence threshold for committing (0.95)")
    p.add_argument("--kv-cache", choices=["none", "prefix"], default="prefix",
                   help="none: every step re-runs the prefix; prefix: prefill + block steps + commit (prefix)")
    p.add_argument("--prompt-length", type=int, default=None,
                   help="prompt tokens of every prompt (default: drawn per prompt, MBPP-like with the chat template)")
    p.add_argument("--steps", type=int, default=32,
                   help="denoising steps per block at most, capped at gen-length // minimal-topk (32)")
    p.add_argument("--minimal-topk", type=int, default=1, help="the official generate's minimal_topk (1)")
    p.add_argument("--eos", choices=EOS_MODES, default="early-stop",
                   help="early-stop: return right after the EOS step (eos_early_stop, the TIDE evaluation); "
                        "block: stop after the block holding the EOS; none: answers never end (early-stop)")
    p.add_argument("--answer-length", type=int, default=None,
                   help="tokens before the EOS in every answer (default: drawn per prompt)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (0)")
    p.add_argument("--token-level", action="store_true", help="also store each token's top-k ids and weights")
    p.add_argument("-o", "--output", required=True, help="output trace file (.parquet)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name such as trace.parquet")
    if args.decode == "autoregressive":
        return _run_autoregressive(args, out)
    cfg = SynthConfig(
        model=get_model(args.model), prompts=args.prompts, gen_length=args.gen_length,
        block_length=args.block_length, threshold=args.threshold, kv_cache=args.kv_cache,
        prompt_length=args.prompt_length, seed=args.seed, token_level=args.token_level, steps=args.steps,
        minimal_topk=args.minimal_topk, eos=args.eos, answer_length=args.answer_length,
    )
    longest_prompt = cfg.prompt_length or math.ceil(cfg.params.prompt_max)   # drawn: size for the longest
    check_synth(cfg.model, cfg.prompts, cfg.gen_length, cfg.block_length, longest_prompt, cfg.kv_cache,
                cfg.token_level)
    trace = synthesize(cfg, progress=lambda it: progress(it, desc="prompts", total=cfg.prompts))
    write_trace(trace, out)
    f = trace.forwards
    steps = int((f["phase"] == "step").sum())
    summary = {
        "output": str(out), "model": cfg.model.name, "kv_cache": cfg.kv_cache, "prompts": cfg.prompts,
        "gen_length": cfg.gen_length, "eos": cfg.eos, "forwards": trace.num_forwards, "step_forwards": steps,
        "tokens_per_step": trace.generated_tokens / steps,
        "generated_tokens": sum(int(m["generated"]) for m in trace.meta.prompts), "seed": cfg.seed,
        "generator_version": GENERATOR_VERSION, "bytes": out.stat().st_size,
    }
    if args.json:
        print_json(summary)
    else:
        print(format_table(["field", "value"], [[k, v] for k, v in summary.items()]))
    return 0


def _run_autoregressive(args: argparse.Namespace, out: Path) -> int:
    cfg = ArConfig(model=get_model(args.model), prompts=args.prompts, prompt_length=args.prompt_length or 128,
                   gen_length=args.gen_length, seed=args.seed, token_level=args.token_level)
    check_synth(cfg.model, cfg.prompts, cfg.gen_length, 1, cfg.prompt_length, "prefix", cfg.token_level)
    trace = synthesize_ar(cfg)
    write_trace(trace, out)
    summary = {
        "output": str(out), "model": cfg.model.name, "decode": "autoregressive", "prompts": cfg.prompts,
        "prompt_length": cfg.prompt_length, "gen_length": cfg.gen_length, "forwards": trace.num_forwards,
        "generated_tokens": trace.generated_tokens, "seed": cfg.seed, "bytes": out.stat().st_size,
    }
    if args.json:
        print_json(summary)
    else:
        print(format_table(["field", "value"], [[k, v] for k, v in summary.items()]))
    return 0
