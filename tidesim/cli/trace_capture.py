"""`tidesim trace capture`: decode with the reference model (random or checkpoint weights) and
record which experts every forward pass routes to, as a trace file (source `captured`).

torch is imported only when the command runs, so the rest of tidesim works without it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.cli.decode_args import add_decode_args, decode_kwargs
from tidesim.cli.output import format_table, print_json, progress
from tidesim.errors import InputError
from tidesim.models import PRESETS, ModelSpec, get_model

INSTALL_HINT = "pip install 'tidesim[runtime]'"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture", help="decode with the LLaDA2.0 reference model and capture its expert routing",
        description="Decode prompts with the LLaDA2.0-architecture reference model by the rules of the official "
                    "LLaDA2.0 generate (block diffusion) and write the expert-activation trace. Weights come from a "
                    "Hugging Face checkpoint folder (--model-dir) or are random from --seed (--config). Text prompts "
                    "go through the folder's tokenizer.json and chat template. Needs torch: " + INSTALL_HINT,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", metavar="DIR", help="Hugging Face LLaDA2.0 checkpoint (config.json + safetensors, "
                                                        "tokenizer.json + tokenizer_config.json for text prompts)")
    src.add_argument("--config", metavar="NAME|PATH",
                     help="preset (tiny, llada2-mini, llada2-flash) or config.json: random weights from --seed")
    p.add_argument("--layers", type=int, metavar="N", help="keep only the first N layers (e.g. mini shapes, 4 layers)")
    prm = p.add_mutually_exclusive_group(required=True)
    prm.add_argument("--prompts", metavar="FILE",
                     help="token ids (one prompt per line, space-separated, or a JSON list of lists), text (one "
                          "prompt per line) or JSONL with a prompt/text field or a chat messages list")
    prm.add_argument("--prompt-tokens", type=int, metavar="N", help="random prompts of N tokens (from --seed)")
    p.add_argument("--num-prompts", type=int, default=1, metavar="K", help="number of random prompts (default 1)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="tokenize text prompts as they are instead of through the chat template")
    add_decode_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, random prompts and sampling")
    p.add_argument("--token-level", action="store_true", help="also store every token's top-k ids and weights")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (default float32)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="trace file to write (.parquet)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Reject bad numbers before any work (one line each); the checked DecodeConfig arguments."""
    positive = {"--num-prompts": args.num_prompts}
    if args.prompt_tokens is not None:
        positive["--prompt-tokens"] = args.prompt_tokens
    if args.layers is not None:
        positive["--layers"] = args.layers
    for flag, value in positive.items():
        if value <= 0:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    kwargs = decode_kwargs(args)
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        raise InputError(f"--model-dir {args.model_dir}: no such folder")
    if Path(args.output).is_dir():
        raise InputError(f"-o {args.output}: is a folder; give a file name such as trace.parquet")
    if args.prompts is not None and Path(args.output).resolve() == Path(args.prompts).resolve():
        raise InputError(f"-o {args.output} is the prompts file; give another output name")
    return kwargs


def random_prompts(spec: ModelSpec, tokens: int, count: int, seed: int) -> list[list[int]]:
    """Uniform random token ids, never the mask or end-of-sequence token."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(spec.vocab_size), [spec.mask_token_id, spec.eos_token_id])
    return [rng.choice(allowed, size=tokens).tolist() for _ in range(count)]


def _model_source(args: argparse.Namespace) -> tuple[ModelSpec, Any, str, Path | None]:
    """(spec, flags, weights label, tokenizer folder) from --model-dir or --config; every
    config and tensor check happens here, before any weight is read."""
    from tidesim_runtime.reference.checkpoint import inspect_checkpoint, read_config, read_config_file, with_layers
    from tidesim_runtime.reference.model import ModelFlags

    if args.model_dir is not None:
        conf = read_config(args.model_dir, args.layers)
        inspect_checkpoint(args.model_dir, args.layers)
        return conf.spec, conf.flags, f"checkpoint {Path(args.model_dir).resolve().name}", Path(args.model_dir)
    weights = f"random (seed {args.seed})"
    if args.config in PRESETS or not Path(args.config).exists():
        return with_layers(get_model(args.config), args.layers), ModelFlags(), weights, None
    path = Path(args.config)
    conf = read_config_file(path / "config.json" if path.is_dir() else path, args.layers)
    return conf.spec, conf.flags, weights, path if path.is_dir() else path.parent


def run(args: argparse.Namespace) -> int:
    kwargs = check_args(args)
    try:
        import torch  # noqa: F401  (only to say how to install it when missing)
    except ImportError:
        raise InputError(f"trace capture needs torch; install it with: {INSTALL_HINT}") from None
    from tidesim_runtime.reference.capture import CaptureSettings, capture_trace, check_prompts
    from tidesim_runtime.reference.checkpoint import load_checkpoint
    from tidesim_runtime.reference.generate import DecodeConfig
    from tidesim_runtime.reference.model import build_model, torch_dtype
    from tidesim_runtime.reference.prompts import load_tokenizer, prepare_prompts, read_prompt_file

    from tidesim.trace.io import write_trace

    dtype = torch_dtype(args.dtype)
    cfg = DecodeConfig(**kwargs)
    spec, flags, weights, tok_dir = _model_source(args)
    if cfg.top_k is not None and cfg.top_k > spec.vocab_size:
        raise InputError(f"--top-k {cfg.top_k} exceeds the vocabulary of {spec.vocab_size} tokens")
    if args.prompts is not None:
        raw = read_prompt_file(args.prompts)
        prepared = prepare_prompts(raw, load_tokenizer(tok_dir), chat_template=not args.no_chat_template,
                                   where=f"--prompts {args.prompts}")
        prompts, texts = [p.tokens for p in prepared], [p.text for p in prepared]
        kinds = sorted({p.kind for p in prepared})
        source = f"{Path(args.prompts).name} ({', '.join(kinds)}" + (
            ", chat template" if any(k != "tokens" for k in kinds) and not args.no_chat_template else "") + ")"
    else:
        prompts = random_prompts(spec, args.prompt_tokens, args.num_prompts, args.seed)
        texts = [None] * len(prompts)
        source = f"random {args.prompt_tokens} tokens x {args.num_prompts} (seed {args.seed})"
    limit = None if flags.rope_scaling == "dynamic" else flags.max_position_embeddings
    check_prompts(prompts, spec, cfg, limit, where=f"--prompts {args.prompts}: prompt" if args.prompts else "prompt")
    start = time.perf_counter()
    model = (load_checkpoint(args.model_dir, dtype, args.layers) if args.model_dir is not None
             else build_model(spec, dtype, seed=args.seed, flags=flags))
    load_s = time.perf_counter() - start
    settings = CaptureSettings(weights=weights, compute_dtype=args.dtype, token_level=args.token_level,
                               extra={"prompt_source": source, "chat_template": not args.no_chat_template})
    torch.manual_seed(args.seed)
    trace, outputs = capture_trace(
        model, spec, prompts, cfg, settings, seed=args.seed, prompt_text=texts,
        blocks=lambda pid: lambda it: progress(it, desc=f"prompt {pid}: blocks",
                                               total=cfg.decoded_blocks(len(prompts[pid]))),
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
            "eos": bool(meta["stopped_at_eos"]), "steps_per_block": meta.get("steps_per_block", []),
        })
    summary = {"output": str(args.output), "model": trace.meta.model.name, "kv_cache": trace.meta.kv_cache,
               "weights": trace.meta.generator["weights"], "forwards": trace.num_forwards,
               "load_seconds": round(load_s, 2), "decode_seconds": round(decode_s, 2), "prompts": rows}
    if args.json:
        summary["tokens"] = outputs
        summary["prompt_text"] = [m.get("text") for m in trace.meta.prompts]
        print_json(summary)
        return 0
    cols = list(rows[0])
    print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    print(f"wrote {args.output}: {trace.num_forwards} forwards x {trace.meta.model.num_moe_layers} MoE layers "
          f"({summary['weights']}, {trace.meta.model.name}, kv-cache {trace.meta.kv_cache}); "
          f"load {load_s:.1f} s, decode {decode_s:.1f} s")
    return 0
