"""`tidesim generate`: decode prompts with a checkpoint (or random weights) while a policy or a plan
places the experts forward by forward from the live routing; writes the run folder.

RUN_DIR holds generations.jsonl (tokens and text per prompt), forwards.parquet (per-forward
statistics), trace.parquet (the routing captured on the way), schedule.npz (the Schedule that
was executed) and summary.json. With --hw the simulator predicts the same run (captured trace +
executed Schedule) and the summary shows predicted vs measured per forward and in total; with
--check-lossless a plain decode of the same prompts is compared token by token. Every check
happens before any work (exit 2, one line); the folder is written beside RUN_DIR and renamed
into place at the end. torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.budget import check_budget, live_budget
from tidesim.cli.calibrate_cmd import require_runtime
from tidesim.cli.cpu_kernel_arg import add_cpu_kernel_arg, profile_kernel, use_cpu_kernel
from tidesim.cli.decode_args import add_decode_args, decode_kwargs
from tidesim.cli.output import format_table, print_json, progress, to_jsonable
from tidesim.errors import InputError
from tidesim.limits import check_cpu_workers, check_tau
from tidesim.notes import noting
from tidesim.policies.driver import check_online, online_names
from tidesim.policies.options import REFRESH_MODES
from tidesim.policies.registry import plan_policy, plan_runner, traits

RUN_MARKER = "tidesim generate run"
RUN_FILES = ("generations.jsonl", "forwards.parquet", "trace.parquet", "schedule.npz", "summary.json")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="decode prompts with a policy or plan placing experts online; write a run folder",
        description="Decode prompts with the LLaDA2.0 reference model (checkpoint or random weights) with every "
                    "non-expert weight on the GPU side and routed experts in host memory; a policy (or a plan) "
                    "decides each forward's placements, copies and demotions from the live routing, and the "
                    "runtime executes them. Writes generations.jsonl, forwards.parquet, trace.parquet, "
                    "schedule.npz and summary.json to RUN_DIR. Needs torch.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", metavar="DIR", help="Hugging Face LLaDA2.0 checkpoint folder")
    src.add_argument("--config", metavar="NAME", help="preset (tiny, llada2-mini, ...) with random weights from --seed")
    p.add_argument("--layers", type=int, metavar="N", help="keep only the first N layers (less memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and sampling (0)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompts file: text (through the checkpoint's tokenizer and chat template) or token ids "
                        "(docs/capture.md)")
    pol = p.add_mutually_exclusive_group(required=True)
    pol.add_argument("--policy", metavar="NAME", help=f"online policy: {', '.join(online_names())}")
    pol.add_argument("--plan", metavar="FILE", help=f"plan.json from `tidesim plan` (runs the {plan_policy()} policy)")
    p.add_argument("--budget", type=int, default=None, metavar="B",
                   help="GPU expert slots per MoE layer (default: half the experts)")
    p.add_argument("--tau", type=int, default=2, metavar="T", help="refresh interval of the tide policies (2)")
    p.add_argument("--refresh", choices=REFRESH_MODES, default="sync", help="tide refresh copies (sync)")
    p.add_argument("--static-from", metavar="TRACE|RUN_DIR",
                   help="cpu-routing, fiddler: take the static GPU set from the popular experts of this trace "
                        "(or a previous run folder), as chosen offline from a warm-up prefix")
    p.add_argument("--warmup-fraction", type=float, default=0.1, metavar="X",
                   help="share of --static-from's forwards that choose the static set (0.1)")
    add_decode_args(p)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="the GPU side: cuda, cpu (the CPU plays the GPU) or auto")
    p.add_argument("--cpu-workers", type=int, default=None, metavar="N", help="CPU worker pool size (profile's, or 1)")
    add_cpu_kernel_arg(p)
    p.add_argument("--hw", metavar="PROFILE", help="hardware profile of this machine: predict the run and compare")
    p.add_argument("--check-lossless", action="store_true",
                   help="also decode plainly and compare tokens and routing")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run folder to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def decode_config(args: argparse.Namespace) -> Any:
    """The DecodeConfig of the shared decode flags (the same flags and checks as `trace capture`)."""
    from tidesim_runtime.reference.generate import DecodeConfig

    return DecodeConfig(**decode_kwargs(args))


def read_prompt_tokens(path: str, spec: Any, model_dir: str | None, cfg: Any
                       ) -> tuple[list[list[int]], list[str | None], Any]:
    """(token ids, prompt text or None, tokenizer or None) per prompt: token ids, or text through
    the checkpoint's tokenizer and chat template (tidesim_runtime.reference.prompts, as `trace capture`)."""
    from tidesim_runtime.reference import prompts as prompt_module
    from tidesim_runtime.reference.capture import check_prompts

    tokenizer = prompt_module.load_tokenizer(model_dir)
    prepared = prompt_module.prepare_prompts(prompt_module.read_prompt_file(path), tokenizer,
                                             where=f"--prompts {path}")
    tokens = [list(q.tokens) for q in prepared]
    check_prompts(tokens, spec, cfg, None, where=f"--prompts {path}: prompt")
    return tokens, [q.text for q in prepared], tokenizer


# ----- checks ---------------------------------------------------------------------------------------
def check_output(out: Path, inputs: list[Path]) -> None:
    """RUN_DIR may be new or a previous run (replaced at the end); nothing else. No input inside it."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"-o {out} exists and is not a folder; give a new folder name")
        if not is_previous_run(out):
            raise InputError(f"-o {out} exists and is not a previous `tidesim generate` run; give a new folder")
    for path in inputs:
        if path.resolve().is_relative_to(out.resolve()):
            raise InputError(f"{path} lies inside the output folder {out}, which the run replaces; "
                             "copy it elsewhere or give another -o")


def is_previous_run(folder: Path) -> bool:
    """A folder this command wrote: summary.json says so and holds nothing but run files."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    names = {p.name for p in folder.iterdir()}
    return isinstance(summary, dict) and summary.get("written_by") == RUN_MARKER and names <= set(RUN_FILES)


def resolve_static_from(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "trace.parquet"
    if not p.is_file():
        raise InputError(f"--static-from {path}: no such trace file (or run folder with trace.parquet)")
    return p


def check_numbers(args: argparse.Namespace) -> None:
    if args.layers is not None and args.layers < 1:
        raise InputError(f"--layers must be a positive integer, got {args.layers}")
    check_tau(args.tau)
    check_cpu_workers(args.cpu_workers)
    if not np.isfinite(args.warmup_fraction) or not 0 < args.warmup_fraction <= 1:
        raise InputError(f"--warmup-fraction must lie in (0, 1], got {args.warmup_fraction}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")


# ----- the command ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    check_numbers(args)
    require_runtime()
    import torch
    from tidesim_runtime.engine.device import select_device
    from tidesim_runtime.measure.deploy import LiveEngine, bind_host_experts, check_deploy_memory, move_non_experts
    from tidesim_runtime.reference.capture import CaptureSettings
    from tidesim_runtime.reference.checkpoint import load_checkpoint, spec_from_checkpoint, with_layers
    from tidesim_runtime.reference.model import build_model

    from tidesim.models import get_model
    from tidesim.scenario import profile_of

    # ----- every check before any work --------------------------------------------------------------
    cfg = decode_config(args)
    out = Path(args.output)
    inputs = [Path(x) for x in (args.prompts, args.plan) if x] + (
        [resolve_static_from(args.static_from)] if args.static_from else [])
    check_output(out, inputs)
    if args.model_dir is not None:
        spec = spec_from_checkpoint(args.model_dir, args.layers)
        weights = f"checkpoint {Path(args.model_dir).resolve().name}"
    else:
        spec = with_layers(get_model(args.config), args.layers, at_most_spec=False)
        weights = f"random (seed {args.seed})"
    prompts, texts, tokenizer = read_prompt_tokens(args.prompts, spec, args.model_dir, cfg)
    hw = profile_of(args.hw) if args.hw else None
    name, options = policy_options(args, spec, hw)
    from tidesim.policies.driver import online_policy

    policy = online_policy(name, spec, options)
    device = select_device(args.device, args.cpu_workers or (hw.cpu.workers if hw else None))
    use_cpu_kernel(args.cpu_kernel, device.dtype, profile_kernel(hw) if hw else "")
    max_tokens, max_context = decode_sizes(cfg, [len(q) for q in prompts])
    check_deploy_memory(spec, device, policy.budget, max_tokens, max_context)

    # ----- work -----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = (load_checkpoint(args.model_dir, device.dtype, args.layers) if args.model_dir is not None
             else build_model(spec, device.dtype, seed=args.seed))
    banks = bind_host_experts(model)
    load_s = time.perf_counter() - t0
    settings = CaptureSettings(weights=weights, compute_dtype=device.dtype_name,
                               extra={"prompt_source": Path(args.prompts).name, "engine": "tidesim generate",
                                      "policy": name})
    # the plain decode runs on the host, with the model's own expert loop, before the engine takes over
    reference = plain_decode(model, spec, prompts, cfg, settings) if args.check_lossless else None
    if device.is_cuda:
        move_non_experts(model, device.torch_device)
    engine = LiveEngine(model, policy, device, banks, max_tokens, max_context)
    result = engine.run(prompts, cfg, settings, seed=args.seed,
                        blocks=lambda pid: lambda it: progress(it, desc=f"prompt {pid + 1}/{len(prompts)}: blocks",
                                                               total=cfg.num_blocks))
    prediction = predict(result, hw) if hw is not None else None
    lossless = compare_lossless(reference, result, device) if reference is not None else None
    summary = build_summary(args, result, spec, device, name, options, prediction, lossless, load_s)
    write_run(out, result, summary, prompts, texts, tokenizer)
    report(args, summary, out)
    if lossless is not None and not lossless["identical"] and not device.is_cuda:
        return 1  # on the CPU path the tokens must be identical: a lossless failure
    return 0


def policy_options(args: argparse.Namespace, spec: Any, hw: Any) -> tuple[str, Any]:
    """The policy name and its options from --policy/--plan, --budget, --tau, --refresh, --static-from."""
    from tidesim.plan import load_plan
    from tidesim.policies import PolicyOptions, uniform

    layers, experts = spec.num_moe_layers, spec.num_experts
    extra: dict[str, object] = {}
    if args.plan:
        plan = load_plan(args.plan)
        plan.check_model(spec)
        name = plan_runner(plan.policy)   # the plan-running policy for a tide plan, the plan's policy otherwise
        extra["plan"] = plan
    else:
        name = args.policy
        check_online(name)
        if traits(name).needs_plan:
            raise InputError(f"the {name} policy runs a plan: give --plan FILE (from `tidesim plan`)")
    budget = args.budget if args.budget is not None else live_budget(experts)
    check_budget(budget, experts, "--budget", spec.name)
    if traits(name).reads_profile and hw is None:
        raise InputError(f"{name} decides with a hardware profile's costs; give --hw PROFILE")
    static = None
    if traits(name).static_set:
        if not args.static_from:
            raise InputError(f"{name} keeps a static GPU set chosen from a warm-up run; give --static-from with a "
                             "trace or an earlier run folder of the same model")
        static = static_from_trace(resolve_static_from(args.static_from), spec, name, budget, args.warmup_fraction)
    options = PolicyOptions(budget=uniform(budget, layers), tau=uniform(args.tau, layers),
                            hw=hw,  # None only for policies that never read it (reads_profile checked above)
                            refresh=args.refresh, warmup_fraction=args.warmup_fraction, static_resident=static,
                            extra=extra)
    return name, options


def static_from_trace(path: Path, spec: Any, policy: str, budget: int, fraction: float) -> np.ndarray:
    """The static set the offline policy would pick on that trace's warm-up prefix."""
    from tidesim.policies.registry import static_set_size
    from tidesim.policies.residency import popular_set
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    workload = workload_from_trace(read_trace(path), spec)
    size = static_set_size(policy, np.full(spec.num_moe_layers, budget, dtype=np.int64), spec.num_experts)
    return popular_set(workload, size, fraction)


def decode_sizes(cfg: Any, prompt_lengths: list[int]) -> tuple[int, int]:
    """(most tokens in one forward, longest context) of the decode."""
    longest = max(prompt_lengths) + cfg.gen_length + cfg.block_length
    if cfg.kv_cache == "none":
        return longest, longest
    return max(max(prompt_lengths), cfg.block_length), longest


def predict(result: Any, hw: Any) -> dict[str, Any]:
    from tidesim_runtime.measure.deploy import predicted_forwards

    from tidesim.workload import workload_from_trace

    workload = workload_from_trace(result.trace)
    (metrics, per_forward), said = noting(lambda: predicted_forwards(workload, result.schedule, hw))
    measured = result.forwards["time_s"].to_numpy()
    err = (per_forward - measured) / np.where(measured > 0, measured, np.nan)
    result.forwards["predicted_s"] = per_forward
    result.forwards["error"] = err
    total_measured = float(measured.sum())
    return {
        "hw": hw.name, "hw_provenance": hw.provenance.kind,
        "predicted_total_s": float(per_forward.sum()), "measured_total_s": total_measured,
        "total_error": float((per_forward.sum() - total_measured) / total_measured) if total_measured else None,
        "median_abs_error_per_forward": float(np.nanmedian(np.abs(err))) if err.size else None,
        "max_abs_error_per_forward": float(np.nanmax(np.abs(err))) if err.size else None,
        "predicted": metrics.to_dict(), "flags": sorted(said),
    }


def plain_decode(model: Any, spec: Any, prompts: list[list[int]], cfg: Any, settings: Any) -> Any:
    """(trace, tokens) of a plain decode: the model's own expert loop on the host (its routed
    experts through the runtime's CPU expert kernel where that kernel changes the model's bits)."""
    from tidesim_runtime.measure.kernel_reference import same_kernel_reference
    from tidesim_runtime.reference.capture import capture_trace

    with same_kernel_reference(model):
        return capture_trace(model, spec, prompts, cfg, settings, seed=None)


def compare_lossless(reference: Any, result: Any, device: Any) -> dict[str, Any]:
    """Tokens and routing of the live run against the plain decode."""
    ref_trace, ref_outputs = reference
    same_tokens = sum(int(a == b) for x, y in zip(ref_outputs, result.outputs, strict=True)
                      for a, b in zip(x, y, strict=False))
    total = sum(max(len(x), len(y)) for x, y in zip(ref_outputs, result.outputs, strict=True))
    same_shape = ref_trace.expert_tokens.shape == result.trace.expert_tokens.shape
    agree = (ref_trace.expert_tokens == result.trace.expert_tokens).all(axis=2) if same_shape else None
    routing = float(agree.mean()) if agree is not None else 0.0
    per_layer = [float(v) for v in agree.mean(axis=0)] if agree is not None else []
    identical = ref_outputs == result.outputs and same_shape and routing == 1.0
    from tidesim_runtime.measure.kernel_reference import reference_rule

    return {"identical": bool(identical), "token_share": same_tokens / total if total else 1.0,
            "routing_share": routing, "routing_share_per_layer": per_layer, "device": device.describe(),
            "reference": reference_rule(device.dtype),
            "rule": "tokens must be identical" if not device.is_cuda else
                    "the plain decode ran on the host, the live one on the GPU, both in the model's dtype: their "
                    "arithmetic differs, so the shares of identical tokens and of identical routing (per MoE layer: "
                    "forwards whose tokens-per-expert match) are reported, not a verdict; the float32 check on one "
                    "device (tidesim_runtime.measure.live.lossless_checks) is the lossless test"}


def build_summary(args: argparse.Namespace, result: Any, spec: Any, device: Any, name: str, options: Any,
                  prediction: dict[str, Any] | None, lossless: dict[str, Any] | None, load_s: float) -> dict[str, Any]:
    m = result.metrics
    frame = result.forwards
    forward_s = float(frame["time_s"].sum())
    generated = sum(len(o) for o in result.outputs)
    return {
        "written_by": RUN_MARKER,
        "setup": {"model": spec.name, "weights": result.trace.meta.generator.get("weights"), "policy": name,
                  "budget": [int(b) for b in result.schedule.budget], "tau": [int(t) for t in options.tau],
                  "refresh": options.refresh, "plan": args.plan, "static_from": args.static_from,
                  "decode": result.trace.meta.generator | {"kv_cache": result.trace.meta.kv_cache,
                                                           "gen_length": result.trace.meta.gen_length,
                                                           "block_length": result.trace.meta.block_length},
                  "device": device.describe(), "prompts": len(result.outputs), "seed": args.seed},
        "totals": {
            "generated_tokens": generated, "forwards": int(len(frame)), "decode_s": result.decode_s,
            "forward_time_s": forward_s, "tokens_per_s": generated / result.decode_s if result.decode_s else 0.0,
            "mean_forward_s": forward_s / len(frame) if len(frame) else 0.0, "load_s": load_s,
            "hit_ratio": m.hit_ratio, "gpu_tokens": m.gpu_tokens, "cpu_tokens": m.cpu_tokens,
            "expert_copies": int(frame["expert_copies"].sum()), "copy_bytes": float(frame["copy_bytes"].sum()),
            "h2d_bytes": m.h2d_bytes, "d2h_bytes": m.d2h_bytes, "promotions": int(frame["promotions"].sum()),
            "demotions": int(frame["demotions"].sum()), "copy_time_s": float(frame["copy_time_s"].sum()),
            "decide_s": float(frame["decide_s"].sum()), "spare_slots": result.spare_slots,
        },
        "where_the_time_went_s": m.breakdown_s,
        "measured": m.to_dict(),
        "prediction": prediction,
        "lossless": lossless,
        "files": list(RUN_FILES),
    }


def write_run(out: Path, result: Any, summary: dict[str, Any], prompts: list[list[int]],
              texts: list[str | None], tokenizer: Any = None) -> None:
    """Write every file into a temporary folder beside `out`, then rename it into place (a previous
    run there is replaced only once the new one is complete)."""
    from tidesim.schedule_io import save_schedule
    from tidesim.trace.io import write_trace

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with open(tmp / "generations.jsonl", "w") as fh:
            for i, (q, tokens) in enumerate(zip(prompts, result.outputs, strict=True)):
                text = tokenizer.decode(list(tokens)) if tokenizer is not None else None
                fh.write(json.dumps({"prompt": i, "prompt_tokens": q, "prompt_text": texts[i], "tokens": tokens,
                                     "text": text}) + "\n")
        result.forwards.to_parquet(tmp / "forwards.parquet", index=False)
        write_trace(result.trace, tmp / "trace.parquet")
        save_schedule(result.schedule, tmp / "schedule.npz")
        (tmp / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2, sort_keys=True) + "\n")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / "run")
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def report(args: argparse.Namespace, summary: dict[str, Any], out: Path) -> None:
    if args.json:
        print_json(summary)
        return
    t = summary["totals"]
    rows = [["generated tokens", t["generated_tokens"]], ["forwards", t["forwards"]],
            ["tokens/s", t["tokens_per_s"]], ["mean forward ms", t["mean_forward_s"] * 1e3],
            ["hit ratio", t["hit_ratio"]], ["expert copies", t["expert_copies"]],
            ["promotions / demotions", f"{t['promotions']} / {t['demotions']}"],
            ["copy time ms", t["copy_time_s"] * 1e3], ["policy decisions ms", t["decide_s"] * 1e3]]
    p = summary["prediction"]
    if p is not None:
        rows += [["predicted total s", p["predicted_total_s"]], ["measured total s", p["measured_total_s"]],
                 ["total error", p["total_error"]],
                 ["median |error| per forward", p["median_abs_error_per_forward"]]]
    ll = summary["lossless"]
    if ll is not None:
        rows += [["lossless", "identical" if ll["identical"] else
                  f"tokens {ll['token_share']:.1%}, routing {ll['routing_share']:.1%} identical"]]
    print(f"{summary['setup']['policy']} on {summary['setup']['model']} ({summary['setup']['device']})")
    print(format_table(["", "value"], rows))
    print(f"wrote {out}/ ({', '.join(RUN_FILES)})")
