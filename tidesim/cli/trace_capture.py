"""`tidesim trace capture`: decode with the reference model (random or checkpoint weights) and
record which experts every forward pass routes to, as a trace file (source `captured`).

torch is imported only when the command runs, so the rest of tidesim works without it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.cli.output import format_table, print_json, progress
from tidesim.errors import InputError
from tidesim.models import ModelSpec, get_model

INSTALL_HINT = "pip install 'tidesim[runtime]'"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture", help="decode with the LLaDA2.0 reference model and capture its expert routing",
        description="Decode prompts with the LLaDA2.0-architecture reference model (block diffusion) and "
                    "write the expert-activation trace. Weights come from a Hugging Face checkpoint folder "
                    "(--model-dir) or are random from --seed (--config). Needs torch: " + INSTALL_HINT,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", metavar="DIR", help="Hugging Face LLaDA2.0 checkpoint (config.json + safetensors)")
    src.add_argument("--config", metavar="NAME|PATH",
                     help="preset (tiny, llada2-mini, llada2-flash) or config.json: random weights from --seed")
    p.add_argument("--layers", type=int, metavar="N", help="keep only the first N layers (e.g. mini shapes, 4 layers)")
    prm = p.add_mutually_exclusive_group(required=True)
    prm.add_argument("--prompts", metavar="FILE",
                     help="prompts as token ids: one prompt per line (space-separated), or a JSON list of lists")
    prm.add_argument("--prompt-tokens", type=int, metavar="N", help="random prompts of N tokens (from --seed)")
    p.add_argument("--num-prompts", type=int, default=1, metavar="K", help="number of random prompts (default 1)")
    p.add_argument("--gen-length", type=int, default=256, metavar="L", help="tokens to generate (default 256)")
    p.add_argument("--block-length", type=int, default=32, help="block length (default 32)")
    p.add_argument("--threshold", type=float, default=0.95, help="commit confidence threshold (default 0.95)")
    p.add_argument("--kv-cache", choices=["none", "prefix"], default="none",
                   help="none: recompute the prefix every step (public TIDE code); prefix: cache it per block")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: argmax)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, random prompts and sampling")
    p.add_argument("--token-level", action="store_true", help="also store every token's top-k ids and weights")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (default float32)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="trace file to write (.parquet)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Reject bad numbers before any work (one line each)."""
    positive = {"--gen-length": args.gen_length, "--block-length": args.block_length,
                "--num-prompts": args.num_prompts}
    if args.prompt_tokens is not None:
        positive["--prompt-tokens"] = args.prompt_tokens
    if args.layers is not None:
        positive["--layers"] = args.layers
    for flag, value in positive.items():
        if value <= 0:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    if not 0 < args.threshold <= 1:
        raise InputError(f"--threshold must lie in (0, 1], got {args.threshold}")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        raise InputError(f"--model-dir {args.model_dir}: no such folder")
    if Path(args.output).is_dir():
        raise InputError(f"-o {args.output}: is a folder; give a file name such as trace.parquet")


def read_prompts(path: str, spec: ModelSpec) -> list[list[int]]:
    """Prompts from a file: a JSON list of lists of token ids, or one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {path}: no such file")
    text = p.read_text()
    prompts: Any
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--prompts {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(prompts, list) or not all(isinstance(q, list) for q in prompts):
            raise InputError(f"--prompts {path}: expected a JSON list of lists of token ids")
    else:
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompts.append([int(t) for t in line.split()])
            except ValueError:
                raise InputError(f"--prompts {path} line {n}: expected space-separated token ids") from None
    if not prompts:
        raise InputError(f"--prompts {path}: holds no prompt")
    for i, q in enumerate(prompts):
        if not q:
            raise InputError(f"--prompts {path}: prompt {i} is empty")
        for t in q:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < spec.vocab_size:
                raise InputError(f"--prompts {path}: prompt {i} has token {t!r} outside [0, {spec.vocab_size})")
            if t == spec.mask_token_id:
                raise InputError(f"--prompts {path}: prompt {i} holds the mask token {t}")
    return [list(q) for q in prompts]


def random_prompts(spec: ModelSpec, tokens: int, count: int, seed: int) -> list[list[int]]:
    """Uniform random token ids, never the mask or end-of-sequence token."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(spec.vocab_size), [spec.mask_token_id, spec.eos_token_id])
    return [rng.choice(allowed, size=tokens).tolist() for _ in range(count)]


def run(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        import torch  # noqa: F401  (only to say how to install it when missing)
    except ImportError:
        raise InputError(f"trace capture needs torch; install it with: {INSTALL_HINT}") from None
    from tidesim_runtime.capture import CaptureSettings, capture_trace
    from tidesim_runtime.checkpoint import load_checkpoint, spec_from_checkpoint, with_layers
    from tidesim_runtime.generate import DecodeConfig
    from tidesim_runtime.model import build_model, torch_dtype

    from tidesim.trace.io import write_trace

    dtype = torch_dtype(args.dtype)
    if args.model_dir is not None:
        spec = spec_from_checkpoint(args.model_dir, args.layers)
        weights = f"checkpoint {Path(args.model_dir).resolve().name}"
    else:
        spec = with_layers(get_model(args.config), args.layers, at_most_spec=False)
        weights = f"random (seed {args.seed})"
    prompts = (read_prompts(args.prompts, spec) if args.prompts is not None
               else random_prompts(spec, args.prompt_tokens, args.num_prompts, args.seed))
    cfg = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, threshold=args.threshold,
                       kv_cache=args.kv_cache, temperature=args.temperature, seed=args.seed)
    start = time.perf_counter()
    model = (load_checkpoint(args.model_dir, dtype, args.layers) if args.model_dir is not None
             else build_model(spec, dtype, seed=args.seed))
    load_s = time.perf_counter() - start
    settings = CaptureSettings(
        weights=weights, compute_dtype=args.dtype, token_level=args.token_level,
        extra={"prompt_source": args.prompts and Path(args.prompts).name or
               f"random {args.prompt_tokens} tokens x {args.num_prompts} (seed {args.seed})"},
    )
    torch.manual_seed(args.seed)
    trace, outputs = capture_trace(
        model, spec, prompts, cfg, settings, seed=args.seed,
        blocks=lambda pid: lambda it: progress(it, desc=f"prompt {pid}: blocks", total=cfg.num_blocks),
    )
    write_trace(trace, args.output)
    decode_s = time.perf_counter() - start - load_s
    return _report(args, trace, outputs, load_s, decode_s)


def _report(args: argparse.Namespace, trace: Any, outputs: list[list[int]], load_s: float, decode_s: float) -> int:
    f = trace.forwards
    rows = []
    for meta in trace.meta.prompts:
        steps = int(meta["denoising_steps"])
        rows.append({
            "prompt": meta["id"], "prompt_tokens": meta["tokens"], "generated": meta["generated"],
            "forwards": int((f["prompt"] == meta["id"]).sum()), "steps": steps,
            "tokens_per_step": round(int(f.loc[f["prompt"] == meta["id"], "committed"].sum()) / max(steps, 1), 3),
            "eos": bool(meta["stopped_at_eos"]),
        })
    summary = {"output": str(args.output), "model": trace.meta.model.name, "kv_cache": trace.meta.kv_cache,
               "weights": trace.meta.generator["weights"], "forwards": trace.num_forwards,
               "load_seconds": round(load_s, 2), "decode_seconds": round(decode_s, 2), "prompts": rows}
    if args.json:
        summary["tokens"] = outputs
        print_json(summary)
        return 0
    cols = list(rows[0])
    print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    print(f"wrote {args.output}: {trace.num_forwards} forwards x {trace.meta.model.num_moe_layers} MoE layers "
          f"({summary['weights']}, {trace.meta.model.name}, kv-cache {trace.meta.kv_cache}); "
          f"load {load_s:.1f} s, decode {decode_s:.1f} s")
    return 0
