"""`tidesim trace convert`: a tidesim trace from the routing an engine recorded (SGLang, vLLM,
llama.cpp); docs/capture.md shows how to record it in each engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from tidesim.cli.output import format_table, print_json
from tidesim.models import get_model
from tidesim.trace.convert import ENGINES, convert
from tidesim.trace.io import write_trace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert routing recorded by SGLang, vLLM or llama.cpp into a trace",
        description="Convert the expert routing a serving engine recorded into a tidesim trace, with provenance "
                    "(engine, input sha256, what was inferred). sglang: expert distribution recorder dumps "
                    "(per_token or stat mode, .pt); sglang-request: /generate responses with "
                    "meta_info.routed_experts (JSON); vllm: prompt_routed_experts + routed_experts per request "
                    "(.npz or JSON); llamacpp: moe-trace CSV (layer,expert). docs/capture.md has a worked example "
                    "per engine.",
    )
    p.add_argument("--from", dest="engine", required=True, choices=sorted(ENGINES), help="engine that recorded it")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="recorded files, in recording order")
    p.add_argument("--model", required=True,
                   help="the model that served: a preset name or its Hugging Face config.json (or folder)")
    p.add_argument("-o", "--output", required=True, help="output trace file (.parquet)")
    p.add_argument("--counts-only", action="store_true",
                   help="store expert counts only, not each token's expert ids (smaller file)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = get_model(args.model)
    trace = convert(args.engine, args.inputs, model, token_level=not args.counts_only)
    out = write_trace(trace, Path(args.output))
    gen = trace.meta.generator
    f = trace.forwards
    summary = {
        "output": str(out), "engine": args.engine, "model": model.name, "decode": trace.meta.decode,
        "prompts": len(trace.prompt_ids), "forwards": trace.num_forwards,
        "prefill_forwards": int((f["phase"] == "prefill").sum()), "generated_tokens": trace.generated_tokens,
        "token_level": trace.topk_ids is not None, "inputs": [i["path"] for i in gen["inputs"]],
        "inferred": gen["inferred"], "cannot_derive": gen["cannot_derive"], "bytes": out.stat().st_size,
    }
    if args.json:
        print_json(summary)
    else:
        rows = [[k, "; ".join(map(str, v)) if isinstance(v, list) else v] for k, v in summary.items()]
        print(format_table(["field", "value"], rows))
    return 0
