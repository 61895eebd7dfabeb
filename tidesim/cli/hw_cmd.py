"""`tidesim hw list|show`: the hardware profiles (bundled presets and measured ones)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from tidesim.cli.output import format_table, print_json
from tidesim.hardware import HardwareProfile, bundled_profiles, get_profile, load_profile
from tidesim.models import PRESETS
from tidesim.notes import noting


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("hw", help="list and show hardware profiles",
                            description="Hardware profiles: datasheet presets and measured machines.")
    hw_sub = parser.add_subparsers(dest="hw_command", metavar="SUBCOMMAND", parser_class=type(parser))
    p = hw_sub.add_parser("list", help="list the bundled profiles", description="List the bundled profiles.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_list)
    s = hw_sub.add_parser("show", help="show one profile and what it predicts for the model presets",
                          description="Show one profile (a bundled name or a YAML file).")
    s.add_argument("profile", metavar="NAME|FILE")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=run_show)
    parser.set_defaults(func=lambda args: parser.print_help())


def _row(name: str, prof: HardwareProfile) -> dict[str, Any]:
    return {
        "name": name, "kind": prof.provenance.kind, "gpu": prof.gpu.name,
        "gpu_mem_gib": round(prof.gpu.memory_gib, 1), "pcie_gen": prof.pcie.generation,
        "h2d_gbs": prof.pcie.h2d_gbs, "cpu_cores": prof.cpu.cores, "cpu_workers": prof.cpu.workers,
    }


def run_list(args: argparse.Namespace) -> int:
    rows = [_row(name, load_profile(path)) for name, path in bundled_profiles().items()]
    if args.json:
        print_json(rows)
    else:
        cols = list(rows[0]) if rows else ["name"]
        print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    return 0


def predictions(prof: HardwareProfile) -> list[dict[str, Any]]:
    """Per model preset: the cost of one expert on GPU and CPU at a few token counts, and its copy."""
    out = []
    tokens = np.array([1, 8, 32, 128])
    for name in ("llada2-mini", "llada2-flash"):
        spec = PRESETS[name]
        gpu = prof.gpu_expert_time(tokens, spec) * 1e6
        cpu = prof.cpu_expert_time(tokens, spec) * 1e6
        copy = float(prof.h2d_time(spec.expert_bytes)) * 1e6
        for t, g, c in zip(tokens, gpu, cpu, strict=True):
            out.append({"model": name, "tokens": int(t), "gpu_expert_us": float(g), "cpu_expert_us": float(c),
                        "h2d_expert_us": copy})
    return out


def run_show(args: argparse.Namespace) -> int:
    prof = get_profile(args.profile)
    rows, said = noting(lambda: predictions(prof))
    notes = sorted(said)
    if args.json:
        print_json({"profile": prof.to_dict(), "predictions": rows, "flags": notes})
        return 0
    p = prof.provenance
    print(f"{prof.name}: {prof.description}")
    print(f"provenance: {p.kind}" + (f", {p.source}" if p.source else "") + (f", {p.date}" if p.date else ""))
    if p.notes:
        print(f"notes: {p.notes}")
    print(f"GPU  {prof.gpu.name}: {prof.gpu.memory_gib:.1f} GiB, {prof.gpu.mem_bandwidth_gbs:g} GB/s, "
          f"{prof.gpu.bf16_tflops:g} TFLOP/s bf16, {len(prof.gpu.expert_ffn)} measured expert curves")
    print(f"PCIe gen {prof.pcie.generation}: H2D {prof.pcie.h2d_gbs:g} GB/s, D2H {prof.pcie.d2h_gbs:g} GB/s, "
          f"{prof.pcie.copy_engines} copy engine(s), measured curves: "
          f"{'yes' if prof.pcie.h2d is not None else 'no'}")
    print(f"CPU  {prof.cpu.name}: {prof.cpu.cores} cores, {prof.cpu.workers} workers, "
          f"{prof.cpu.mem_bandwidth_gbs:g} GB/s, {len(prof.cpu.expert_ffn)} measured expert curves")
    print()
    cols = ["model", "tokens", "gpu_expert_us", "cpu_expert_us", "h2d_expert_us"]
    print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    for flag in notes:
        print(f"note: {flag}")
    return 0
