"""`tidesim trace stats`: routing statistics of a trace (unique experts, similarity, skew, hit ratio)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from tidesim.budget import TIDE_MAX_EXPERTS_PER_LAYER, check_budget, live_budget
from tidesim.cli.output import format_table, print_json
from tidesim.limits import check_tau
from tidesim.scenario import int_list, read_inputs
from tidesim.trace.stats import DEFAULT_TAUS, trace_stats


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats", help="routing statistics: unique experts, step similarity, skew, TIDE hit ratio vs tau",
        description="Routing statistics of a trace: unique experts per step, cosine/Jaccard similarity "
                    "of expert activations d steps apart, expert popularity skew, and the hit ratio of "
                    "TIDE's interval refresh for a GPU budget per layer as a function of tau.",
    )
    p.add_argument("trace", metavar="TRACE", help="trace file or bundled trace name (see `tidesim trace list`)")
    p.add_argument("--budget", type=int, default=None,
                   help="GPU experts per MoE layer (default: the TIDE scripts' 128 for mini, 96 for flash, "
                        "else half the experts)")
    p.add_argument("--taus", default=",".join(map(str, DEFAULT_TAUS)),
                   help="refresh intervals, comma-separated (default 1,2,4,8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def parse_taus(text: str) -> list[int]:
    """--taus as comma-separated intervals (scenario.int_list), each at least 1 (the --tau rule)."""
    taus = int_list(text, "--taus", "integers such as 1,2,4,8")
    check_tau(min(taus), "--taus")
    return taus


def run(args: argparse.Namespace) -> int:
    taus = parse_taus(args.taus)
    trace = read_inputs(args.trace)[1]
    model = trace.model
    budget = args.budget
    if budget is None:
        budget = TIDE_MAX_EXPERTS_PER_LAYER.get(model.name, live_budget(model.num_experts))
    check_budget(budget, model.num_experts, model=model.name)
    stats = trace_stats(trace, budget=budget, taus=taus)
    stats["trace"] = str(args.trace)
    if args.json:
        print_json(stats)
    else:
        print(render(stats))
    return 0


def render(s: dict[str, Any]) -> str:
    """Readable tables: summary, similarity by distance, hit ratio by tau, per layer."""
    d = s["decode"]
    budget = int(np.asarray(s["hit_ratio"]["budget_per_layer"])[0])
    ar = s.get("decode_shape") == "autoregressive"
    head = ("autoregressive" if ar else
            f"kv-cache {s['kv_cache']}, block {s['block_length']}, threshold {s['threshold']}")
    out = [f"{s['trace']}: {s['model']}, {head}, {s['source']}, prompts {len(s['prompts'])}"]
    out.append(format_table(["quantity", "value"], [
        ["forwards", d["forwards"]], ["decode forwards" if ar else "denoising steps", d["step_forwards"]],
        ["steps per prompt (mean)", d["steps_per_prompt_mean"]],
        ["steps per prompt", _short(d["steps_per_prompt"])],
        ["generated tokens per prompt (mean)", d["generated_per_prompt_mean"]],
        ["generated tokens per prompt", _short(d["generated_per_prompt"])],
        ["steps per block (mean)", d["steps_per_block_mean"]],
        ["steps per block (min..max)", f"{d['steps_per_block_min']}..{d['steps_per_block_max']}"],
        ["tokens committed per step", d["tokens_per_step"]],
        ["unique experts per layer per step", s["unique_experts_per_step"]],
        ["  over the current block's tokens", _num(s["unique_experts_per_step_block"])],
        ["top-10% experts' share (trace)", s["skew"]["top10_share"]],
        ["top-10% experts' share (per prompt)", s["skew"]["prompt_top10_share"]],
        ["Gini of expert load (trace)", s["skew"]["gini"]],
        ["Gini of expert load (per prompt)", s["skew"]["prompt_gini"]],
    ]))
    fw, blk = s["similarity"]["forward"], s["similarity"]["block"]
    rows = []
    for i, dist in enumerate(fw["distance"]):
        row: list[Any] = [dist, fw["pairs"][i], fw["cosine"][i], fw["jaccard"][i]]
        row += [blk["cosine"][i], blk["jaccard"][i]] if blk else ["-", "-"]
        rows.append(row)
    scope = "d tokens apart (same prompt)" if ar else "d steps apart (same prompt and block)"
    out.append(f"\nsimilarity of expert activations {scope}")
    out.append(format_table(["d", "pairs", "cosine (forward)", "jaccard (forward)", "cosine (block)",
                             "jaccard (block)"], rows))
    out.append(f"block scope: {s['block_scope']}")
    hr = s["hit_ratio"]
    out.append(f"\nTIDE hit ratio, budget {budget} experts per layer")
    rows = []
    for tau in hr["taus"]:
        per_prompt = list(hr["per_prompt"][str(tau)].values())
        curve = np.asarray(hr["by_step"][str(tau)])
        rows.append([tau, hr["overall"][str(tau)], hr["step_mean"][str(tau)], min(per_prompt), max(per_prompt),
                     _short([round(float(v), 3) for v in curve[:8]])])
    out.append(format_table(["tau", "hit ratio", "mean over steps", "prompt min", "prompt max",
                             "by step index 0, 1, ... (mean over prompts)"], rows))
    out.append("\nper MoE layer")
    headers = ["layer", "unique/step", "cos d=1", "jaccard d=1", "top-10%", "gini"]
    headers += [f"hit tau={t}" for t in hr["taus"]]
    rows = []
    for i, layer in enumerate(s["layers"]):
        row = [layer, float(s["unique_experts_per_step_per_layer"][i]),
               float(fw["cosine_per_layer"][0][i]) if fw["distance"] else float("nan"),
               float(fw["jaccard_per_layer"][0][i]) if fw["distance"] else float("nan"),
               float(s["skew"]["top10_share_per_layer"][i]), float(s["skew"]["gini_per_layer"][i])]
        row += [float(hr["per_layer"][str(t)][i]) for t in hr["taus"]]
        rows.append(row)
    out.append(format_table(headers, rows))
    return "\n".join(out)


def _short(values: list[Any], n: int = 12) -> str:
    """The first n values, comma-separated, with how many more."""
    text = ", ".join(str(v) for v in values[:n])
    return text + (f", ... ({len(values) - n} more)" if len(values) > n else "")


def _num(value: Any) -> Any:
    return "-" if value is None else value
