"""The prepared GPU measurement: one call on a lent GPU machine measures everything tidesim needs.

Steps, ordered by value (each a process or function with its share of the wall-clock budget;
one that fails or runs out of time is recorded, what it measured so far is kept, and the rest
still run). Each step's process is forked from one server that imported torch and the project
once (StepProcesses), so no step pays Python's and torch's start-up again:

1. install   the carried wheels (simpy, pulp) into a scratch folder, no network; the project runs
             from this tree (PYTHONPATH), so nothing needs to be built on the machine; the same
             process reports torch, CUDA and the GPU for env.json;
2. traces    the mini traces bundled with tidesim (the dry run synthesizes tiny ones, both KV
             modes in one process);
3. calibrate `tidesim calibrate --quick` -> profile.yaml;
4. plan      `tidesim plan` at the second budget on the calibrated profile (seconds: a DP);
5. validate  `tidesim validate`, ONE process per trace holding every configuration (policies x
             budgets (64, 128) x refresh sync and async, the planned policy on the prefix trace),
             so the host expert banks are filled and pinned once per trace: prefix (with repeats:
             the throughput figures), none, and the prefix trace's window after its first block.
             Each configuration is written as soon as it is measured (configurations.jsonl), so
             a step cut off by its timeout keeps what it measured;
6. throughput every policy at the second budget, from the prefix validation's repeats;
7. live      `tidesim generate` on mini shapes with random weights (the first layers), one run per
             policy, checked against the plain decode (--check-lossless) and predicted.

Everything goes to --out (at most 8 files: env.json, profile.yaml, validate_prefix.json (with the
throughput rows), validate_none.json, validate_window.json, live.json, summary.txt, log.txt; the
log and the summary are rewritten after every step) with the provenance (machine, driver, torch,
commit or source digest, command lines); a short table prints last, with the run's own time.

--dry-run runs the same steps and writes the same files on the CPU at tiny sizes (the tiny model
preset, synthesized traces, budgets 4 and 8 of its 16 experts); tests/test_bench_gpu.py runs it.
See docs/validation.md for how to run it on a lent machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUTPUT_FILES = ("env.json", "profile.yaml", "validate_prefix.json", "validate_none.json", "validate_window.json",
                "live.json", "summary.txt", "log.txt")
VALIDATIONS = ("prefix", "none", "window")   # validate_<name>.json; the window is the prefix trace's


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the real sizes on a GPU, tiny ones for the dry run."""

    model: str
    device: str
    traces: dict[str, str]            # kv mode -> bundled trace name (None: synthesize)
    budgets: tuple[int, int]          # the two budgets validated; the second is the throughput budget
    layers: int
    forwards: int
    policies: str
    taus: str
    plan_taus: str
    live_layers: int                  # layers kept by `generate --layers` (dense included)
    live_gen: int
    live_prompt: int
    live_policies: tuple[str, ...]
    repeats: int                      # repeats of the prefix validation (its median run is kept)


GPU = Sizes(model="llada2-mini", device="cuda",
            traces={"prefix": "llada2-mini_prefix_g1024", "none": "llada2-mini_none_g1024"},
            budgets=(64, 128), layers=8, forwards=48, policies="cpu-routing,fiddler,tide,full-swap,all-gpu",
            taus="4", plan_taus="1,2,4,8", live_layers=3, live_gen=64, live_prompt=32,
            live_policies=("tide", "full-swap", "fiddler", "cpu-routing"), repeats=3)
DRY = Sizes(model="tiny", device="cpu", traces={}, budgets=(4, 8), layers=1, forwards=4,
            policies="cpu-routing,fiddler,tide,full-swap,all-gpu", taus="4", plan_taus="1,2",
            live_layers=3, live_gen=16, live_prompt=6, live_policies=("tide", "cpu-routing"), repeats=2)


@dataclass
class Run:
    """The state of one measurement run: where things go, the clock, the log."""

    out: Path
    work: Path
    sizes: Sizes
    dry: bool
    budget_s: float
    site: Path
    t0: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)
    torch_facts: dict[str, Any] = field(default_factory=dict)
    registry: dict[str, Any] = field(default_factory=dict)   # registry_facts, asked once per run
    procs: StepProcesses | None = None
    fork: bool = True                 # steps forked from one server (StepProcesses); False: fresh interpreters

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {text}"
        self.log_lines.append(line)
        print(line, flush=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.site), str(REPO), str(REPO / "runtime")])
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("MPLBACKEND", "Agg")
        if self.dry:
            # tiny shapes on a small shared CPU: torch's intra-op thread pool only adds spinning (the
            # plain decode's index_add_ took 50 ms a call at load 15); the runtime sets its own
            # thread counts explicitly (cpu-as-gpu side, worker pool), so only defaults change
            env["OMP_NUM_THREADS"] = "1"
        return env

    def tidesim(self, args: list[str], share: float) -> subprocess.CompletedProcess[str]:
        """`tidesim ARGS` (the CLI's main) from the installed copy with `share` of the time left."""
        return self.command(["tidesim", *args], share, " ".join(args))

    def python(self, code: str, share: float, what: str, args: list[str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        """`python -c CODE ARGS` from the installed copy with `share` of the time left."""
        return self.command(["-c", code, *(args or [])], share, what)

    def command(self, cmd: list[str], share: float, what: str) -> subprocess.CompletedProcess[str]:
        """One step's process (a child of the fork server, see StepProcesses; a fresh interpreter
        with --no-fork-server or once a forked step failed to start CUDA), its output logged."""
        timeout = max(10.0, self.left() * share)
        shown = f"{sys.executable} -m tidesim {what}" if cmd[0] == "tidesim" else f"{sys.executable} -c ...  ({what})"
        self.log(f"$ {shown}   (timeout {timeout:.0f} s)")
        if self.fork and self.procs is None:
            self.procs = StepProcesses(self.env(), self.work)
        proc = self.procs.run(cmd, timeout) if self.fork and self.procs is not None else self.spawn(cmd, timeout)
        if proc.returncode != 0 and self.fork and fork_trouble(proc.stderr):
            self.log("  a forked step could not start CUDA: this step and the rest run in fresh interpreters")
            self.fork = False
            proc = self.spawn(cmd, timeout)
        for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
            self.log("  " + line)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        return proc

    def spawn(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """The step in a fresh interpreter (`python -m tidesim ARGS` or `python -c CODE ARGS`)."""
        argv = [sys.executable, "-m", *cmd] if cmd[0] == "tidesim" else [sys.executable, *cmd]
        return subprocess.run(argv, env=self.env(), cwd=self.work, capture_output=True, text=True, timeout=timeout,
                              check=False)


def fork_trouble(stderr: str) -> bool:
    """Whether a step failed because CUDA cannot start in a forked process (the fork server would
    then have initialised CUDA before forking, which it must not)."""
    return bool(re.search(r"forked subprocess|CUDA[^\n]*(initiali[sz]ation error|failed to initiali[sz]e)",
                          stderr, re.IGNORECASE))


class StepProcesses:
    """Every step in its own process, forked from ONE server that has imported torch and the
    project once (multiprocessing's forkserver): a step still has its own process, timeout and
    exit status, and a crash or a CUDA error stays in it, but no step pays the interpreter's and
    torch's start-up again (about 3 s each on the 2-core development machine, most of the dry
    run's time over its ten processes: 73 s with them, 22 s without, at load 5). The server
    itself never touches CUDA (importing torch does not initialise it), so each step
    initialises CUDA in its own process as before.

    cmd: ["tidesim", ARGS...] runs the CLI's main(ARGS); ["-c", CODE, ARGS...] runs CODE as
    `python -c` would, with sys.argv = ["-c", ARGS...]."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        # multiprocessing gives each child this process's sys.path, not the server's: the project
        # and the carried wheels come from PYTHONPATH (not installed on a lent machine)
        self.extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.cwd = cwd
        self.ctx = multiprocessing.get_context("forkserver")
        # what every step imports, once (a module that fails to import here is left to the step
        # that needs it, which reports the error)
        self.ctx.set_forkserver_preload(["__main__", *PRELOAD, *command_modules()])
        self.n = 0

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The run's environment and PYTHONPATH folders in this process only while a step starts
        (the server, started by the first step, takes the environment for its preloads; each child
        this sys.path), then this process's own again, so the caller (a test, the driver) is left
        as it was."""
        saved_env, saved_path = dict(os.environ), list(sys.path)
        os.environ.update(self.env)
        sys.path[0:0] = [p for p in self.extra if p not in sys.path]
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            sys.path[:] = saved_path

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        self.n += 1
        out, err = self.cwd / f".step{self.n}.out", self.cwd / f".step{self.n}.err"
        proc = self.ctx.Process(target=step_main, args=(cmd, str(self.cwd), str(out), str(err), self.env),
                                name=f"tidesim-step-{self.n}")
        with self.applied():
            proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd[:2], timeout, output=read_text(out), stderr=read_text(err))
        code = proc.exitcode if proc.exitcode is not None else -1
        return subprocess.CompletedProcess(cmd[:2], code, read_text(out), read_text(err))


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def step_main(cmd: list[str], cwd: str, out: str, err: str, env: dict[str, str]) -> None:
    """In the step's process: the run's environment (the fork server is one per process and keeps
    the environment it started with), stdout and stderr to files, then the CLI or the code; the
    exit status is main()'s (or SystemExit's, or 1 on an exception, which multiprocessing prints)."""
    os.environ.update(env)
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    if cmd[0] == "tidesim":
        from tidesim.cli import main as cli_main

        sys.argv = ["tidesim", *cmd[1:]]
        sys.exit(cli_main(cmd[1:]))
    sys.argv = ["-c", *cmd[2:]]
    exec(compile(cmd[1], "<string>", "exec"), {"__name__": "__main__"})


PRELOAD = ("torch", "matplotlib.pyplot", "tidesim.cli", "tidesim_runtime.measure.live",
           "tidesim_runtime.measure.validate")


def command_modules() -> list[str]:
    """The CLI's command modules (tidesim.cli imports them when it builds its parser)."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    try:
        from tidesim.cli import COMMAND_MODULES
    except ImportError:
        return []
    return list(COMMAND_MODULES)


def step(run: Run, name: str, fn: Callable[[], Any]) -> Any:
    """Run one step; record its time and outcome; never raise (the next steps still run)."""
    t0 = time.monotonic()
    run.log(f"== {name}")
    record: dict[str, Any] = {"step": name}
    try:
        result = fn()
        record["status"] = "ok"
        return result
    except subprocess.TimeoutExpired:
        record["status"] = "timed out"
    except Exception as exc:  # recorded, not fatal: one loan is all there is
        record["status"] = f"failed: {type(exc).__name__}: {exc}"
    finally:
        record["seconds"] = round(time.monotonic() - t0, 1)
        run.steps.append(record)
        run.log(f"== {name}: {record['status']} in {record['seconds']} s")
    return None


# ----- the steps --------------------------------------------------------------------------------
def install(run: Run, wheels: Path) -> None:
    """pip install the carried wheels into run.site, without network; the project itself runs from
    this tree through PYTHONPATH (run.env), so the machine needs no build tools for it."""
    found = sorted(str(p) for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        run.log(f"no wheels in {wheels}: simpy and pulp must already be installed")
    else:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(run.site), *found]
        run.log("$ " + " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30.0, run.left() * 0.2), check=False)
        if proc.returncode != 0:
            errors = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
            raise RuntimeError("pip failed: " + " | ".join(errors[-4:] or ["no message"]))
    try:
        check = run.python(IMPORT_CHECK, 0.2, "imports; torch, CUDA and the GPU")
    except RuntimeError as exc:
        raise RuntimeError(f"the project does not import from {REPO}: {exc}") from None
    if str(REPO) not in check.stdout:
        raise RuntimeError(f"the project does not import from {REPO}: {check.stdout.strip()[-300:]}")
    lines = check.stdout.strip().splitlines()
    run.log("imports: " + lines[0])
    run.torch_facts = json.loads(lines[-1])


# one process checks the imports and reports torch, CUDA and the GPU (no second torch start-up)
IMPORT_CHECK = ("import json, tidesim, tidesim_runtime, simpy, pulp, torch; "
                "print(tidesim.__file__, torch.__version__); "
                "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
                "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")


def traces(run: Run) -> dict[str, str]:
    """Trace per KV mode: bundled names on the GPU; synthesized tiny traces in the dry run."""
    if run.sizes.traces:
        return dict(run.sizes.traces)
    out = {kv: str(run.work / f"{run.sizes.model}_{kv}.parquet") for kv in ("prefix", "none")}
    calls = [["trace", "synth", "--model", run.sizes.model, "--prompts", "2", "--gen-length", "32",
              "--prompt-length", "8", "--block-length", "16", "--kv-cache", kv, "-o", path] for kv, path in out.items()]
    code = f"import sys; from tidesim.cli import main; sys.exit(max(main(a) for a in {calls!r}))"
    run.python(code, 0.1, "synthesize both traces")
    return out


def calibrate(run: Run) -> Path:
    prof = run.work / "profile.yaml"
    run.tidesim(["calibrate", "--quick", "--models", run.sizes.model, "--device", run.sizes.device,
                 "-o", str(prof)], 0.25)
    shutil.copyfile(prof, run.out / "profile.yaml")
    return prof


def validate(run: Run, trace: str, profile: Path, name: str, extra: list[str], share: float) -> dict[str, Any]:
    """One `tidesim validate` run, written to --out as `validate_<name>.json` as soon as it ends;
    if it fails or times out, the configurations it finished (its configurations.jsonl, rewritten
    after each one) are written instead, marked partial, and the step is still recorded as failed."""
    folder = run.work / f"validate_{name}"
    s = run.sizes
    try:
        run.tidesim(["validate", "--trace", trace, "--hw", str(profile), "--layers", str(s.layers),
                     "--forwards", str(s.forwards), "--taus", s.taus, "--device", s.device, "-o", str(folder),
                     *extra], share)
    except (subprocess.TimeoutExpired, RuntimeError):
        kept = partial_results(folder / "configurations.jsonl")
        write_json(run.out / f"validate_{name}.json", kept)
        run.log(f"kept {len(kept['rows'])} configuration(s) measured before the step ended")
        raise
    data: dict[str, Any] = json.loads((folder / "results.json").read_text())
    write_json(run.out / f"validate_{name}.json", data)
    return data


def partial_results(path: Path) -> dict[str, Any]:
    """What a cut-off validate measured: one record per finished configuration (a line that was
    being written when the process died is skipped)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    rows = [r["row"] for r in records]
    errs = sorted(abs(r["error"]) for r in rows if r.get("error") is not None)
    summary = {"configurations": float(len(rows)),
               "median_abs_error": errs[len(errs) // 2] if errs else None, "max_abs_error": max(errs, default=None)}
    return {"partial": True, "setup": {}, "summary": summary, "rows": rows, "configurations": records}


PLAN_AT_BUDGET = r"""
import sys
from tidesim.cli import main
from tidesim.models import get_model
from tidesim.planner.candidates import expert_slots, uniform_budget
spec, budget, plan_args = get_model(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]

def holds(gib):
    try:
        return uniform_budget(expert_slots(spec, gib), spec.num_moe_layers, spec.num_experts) >= budget
    except Exception:
        return False

lo, hi = 0.0, 4096.0   # bisection: the least memory whose even share is `budget` experts per layer
for _ in range(80):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if holds(mid) else (mid, hi)
print(f"GPU memory that holds {budget} experts per layer next to the rest: {hi!r} GiB", flush=True)
sys.exit(main(["plan", *plan_args, "--gpu-mem-gib", repr(hi)]))
"""


def plan(run: Run, trace: str, profile: Path) -> Path:
    """A plan whose memory holds exactly the second budget per layer when shared evenly (so the
    planned policy is compared at that budget), with budget and tau per layer chosen by the
    planner; the memory (by bisection) and the plan in one process."""
    path = run.work / "plan.json"
    b = str(run.sizes.budgets[1])
    run.python(PLAN_AT_BUDGET, 0.15, f"memory for budget {b}, then tidesim plan", [
        run.sizes.model, b, "--trace", trace, "--hw", str(profile), "--budgets", b, "--taus", run.sizes.plan_taus,
        "--time-limit", "30", "-o", str(path)])
    return path


def throughput(run: Run, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured tokens/s of every policy at the second budget (sync and async refresh, planned),
    from the prefix validation: its median of `repeats` runs per configuration. Kept in
    validate_prefix.json under "throughput"."""
    b = run.sizes.budgets[1]
    planned = registry_facts(run)["plan_policy"]
    rows = []
    for c in data["configurations"]:
        row = c.get("row") or {}
        if row.get("budget") != b and row.get("policy") != planned:
            continue
        m = c["measured"]
        rows.append({"config": c["config"], "refresh": row.get("refresh", "sync"), "tokens_per_s": m["tokens_per_s"],
                     "step_ms": m["step_time_s"] * 1e3, "predicted_step_ms": c["predicted"]["step_time_s"] * 1e3,
                     "hit_ratio": m["hit_ratio"], "expert_copies": m["expert_copies"],
                     "repeats_step_ms": [x * 1e3 for x in c.get("measured_step_s", [])]})
    if not rows:
        raise RuntimeError(f"the prefix validation has no configuration at budget {b}")
    data["throughput"] = rows
    write_json(run.out / "validate_prefix.json", data)
    return rows


# The lossless test on the device itself: a float32 copy of the live model (mini shapes, random
# weights, the first layers), ONE plain decode, then a decode through the executor per policy,
# all on the same device (tidesim_runtime.measure.live.lossless_checks). A bf16 run on a GPU can
# only report agreement (its kernels round differently from the plain decode's); this one must
# give identical tokens.
FLOAT32_CHECK = r"""
import json, sys
import torch
from tidesim.hardware import get_profile
from tidesim.models import get_model
from tidesim.policies import PolicyOptions, uniform
from tidesim_runtime.engine.device import select_device
from tidesim_runtime.measure.live import lossless_checks
from tidesim_runtime.reference.checkpoint import with_layers
from tidesim_runtime.reference.generate import DecodeConfig
from tidesim_runtime.reference.model import build_model
name, layers, device, budget, gen, plen, profile = sys.argv[1:8]
spec = with_layers(get_model(name), int(layers), at_most_spec=False)
hw = get_profile(profile)
dev = select_device(device, hw.cpu.workers)
L, b = spec.num_moe_layers, min(int(budget), spec.num_experts)
runs = [(p, PolicyOptions(budget=uniform(b, L), tau=uniform(4, L), hw=hw, refresh=r))
        for p, r in (("tide", "sync"), ("tide", "async"), ("full-swap", "sync"), ("fiddler", "sync"),
                     ("cpu-routing", "sync"))]
cfg = DecodeConfig(gen_length=int(gen), block_length=min(32, int(gen)), kv_cache="prefix")
prompt = [(7 * i + 3) % 1000 + 2 for i in range(int(plen))]
out = lossless_checks(build_model(spec, torch.float32, seed=0), prompt, cfg, runs, dev, float32=True)
print(json.dumps([{"policy": r.policy, "identical": r.identical, "problems": r.problems, "forwards": r.forwards,
                   "tokens": len(r.live_tokens), "device": dev.describe(), "dtype": "float32"} for r in out]))
"""


def float32_check(run: Run, profile: Path) -> list[dict[str, Any]]:
    """The float32 lossless check on the device (FLOAT32_CHECK): one row per policy."""
    s = run.sizes
    proc = run.python(FLOAT32_CHECK, 0.3, "float32 lossless check, one shared plain decode",
                      [s.model, str(s.live_layers), s.device, str(s.budgets[1]), str(s.live_gen), str(s.live_prompt),
                       str(profile)])
    rows: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


# What the registry says about the policies (tidesim.policies.registry), asked in a fresh
# interpreter with the run's environment, so the answer comes from the copy the steps run (the
# driver itself imports tidesim.cli only to list the fork server's preloads, command_modules).
REGISTRY_FACTS = r"""
import json
from tidesim.policies.registry import plan_policy, policy_names
print(json.dumps({"static_set": policy_names(static_set=True), "plan_policy": plan_policy()}))
"""


def registry_facts(run: Run) -> dict[str, Any]:
    """The static-set policies and the plan policy, from the registry's traits (asked once per run)."""
    if not run.registry:
        proc = run.python(REGISTRY_FACTS, 0.05, "policy traits from the registry")
        run.registry.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return run.registry


def live(run: Run, profile: Path) -> dict[str, Any]:
    """`tidesim generate` (random weights, mini shapes, the first layers) for a few policies, each
    with --check-lossless (a plain decode next to it) and the prediction from the calibrated profile."""
    s = run.sizes
    prompts = run.work / "live_prompts.txt"
    prompts.write_text(" ".join(str((7 * i + 3) % 1000 + 2) for i in range(s.live_prompt)) + "\n")
    rows: list[dict[str, Any]] = []
    static_set = set(registry_facts(run)["static_set"])
    first = run.work / f"live_{s.live_policies[0]}"
    for k, policy in enumerate(s.live_policies):
        folder = run.work / f"live_{policy}"
        share = 0.7 / (len(s.live_policies) - k)        # an even share of what is left (the float32 check last)
        # the static policies take their GPU set from the first run's popular experts (a warm-up run)
        static = ["--static-from", str(first)] if policy in static_set and folder != first else []
        proc = run.tidesim(["generate", "--config", s.model, "--layers", str(s.live_layers), "--seed", "0",
                            "--prompts", str(prompts), "--policy", policy, "--budget", str(s.budgets[1]),
                            "--tau", "4", "--gen-length", str(s.live_gen), "--block-length", str(min(32, s.live_gen)),
                            "--kv-cache", "prefix", "--device", s.device, "--hw", str(profile), "--check-lossless",
                            "-o", str(folder), "--json", *static], share * 0.9)
        summary: dict[str, Any] = json.loads(proc.stdout)
        m, lossless, pred = summary["measured"], summary.get("lossless") or {}, summary.get("prediction") or {}
        rows.append({"policy": policy, "identical": lossless.get("identical"),
                     "token_share": lossless.get("token_share"), "routing_share": lossless.get("routing_share"),
                     "routing_share_per_layer": lossless.get("routing_share_per_layer"),
                     "device": lossless.get("device"), "forwards": m["forwards"], "tokens": m["generated_tokens"],
                     "tokens_per_s": m["tokens_per_s"], "step_ms": m["step_time_s"] * 1e3,
                     "hit_ratio": m["hit_ratio"], "expert_copies": m["expert_copies"], "prediction": pred})
    result = {"model": s.model, "layers": s.live_layers, "device": s.device, "budget": s.budgets[1],
              "gen_length": s.live_gen, "prompt_length": s.live_prompt, "kv_cache": "prefix", "rows": rows}
    write_json(run.out / "live.json", result)      # kept if the float32 check runs out of time
    result["float32_check"] = float32_check(run, profile)
    return result


# ----- provenance and summary -------------------------------------------------------------------
def source_digest() -> str:
    """git commit when the tree has its .git, else a digest of the sources that ran."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                                   text=True, timeout=10, check=False).stdout.strip()
            return proc.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    h = hashlib.sha256()
    for folder in ("tidesim", "runtime", "bench/gpu"):
        for p in sorted((REPO / folder).rglob("*.py")):
            h.update(p.relative_to(REPO).as_posix().encode())
            h.update(p.read_bytes())
    return "sources sha256 " + h.hexdigest()[:16]


def environment(run: Run) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "python": sys.version.split()[0], "platform": platform.platform(), "source": source_digest(),
        "dry_run": run.dry, "sizes": run.sizes.__dict__, "command": " ".join(sys.argv),
        "cpu_count": os.cpu_count(),
    }
    facts["torch"] = run.torch_facts or "not known: the install step did not import torch"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max,"
                            "pcie.link.width.max,clocks.max.sm", "--format=csv"], capture_output=True, text=True,
                           check=False, timeout=30)
        facts["nvidia_smi"] = q.stdout.strip()
    try:
        with open("/proc/meminfo") as fh:
            facts["meminfo"] = fh.readline().strip()
    except OSError:
        pass
    return facts


def summary_table(run: Run, results: dict[str, Any]) -> str:
    lines = [f"tidesim GPU measurement ({'DRY RUN, CPU, tiny sizes' if run.dry else 'GPU'}), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {run.sizes.model}"]
    lines.append("steps: " + ", ".join(f"{s['step']} {s['status']} ({s['seconds']} s)" for s in run.steps))
    for name in VALIDATIONS:
        data = results.get(f"validate_{name}")
        if data and data["rows"]:
            sm = data["summary"]
            lines.append(f"validate {name}: {int(sm['configurations'])} configurations, median |error| "
                         f"{sm['median_abs_error']:.1%}, max {sm['max_abs_error']:.1%}"
                         + (" (partial: the step ended early)" if data.get("partial") else ""))
    tp = results.get("throughput")
    if tp:
        lines.append(f"{'configuration':32} {'refresh':7} {'tok/s':>9} {'step ms':>9} {'pred ms':>9} {'hit':>5}")
        for r in tp:
            lines.append(f"{r['config']:32} {r['refresh']:7} {r['tokens_per_s']:9.1f} {r['step_ms']:9.2f} "
                         f"{r['predicted_step_ms']:9.2f} {r['hit_ratio']:5.2f}")
    lv = results.get("live")
    if lv:
        for r in lv["rows"]:
            lines.append(f"live {r['policy']:12} identical={r['identical']} token share={r['token_share']} "
                         f"tokens={r['tokens']} "
                         f"tok/s={r['tokens_per_s'] or 0:.1f}")
        for r in lv.get("float32_check", []):
            lines.append(f"lossless float32 {r['policy']:16} identical={r['identical']} on {r['device']}")
    lines.append(f"this run took {time.monotonic() - run.t0:.1f} s of wall time")
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="output folder (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="same steps and files on the CPU at tiny sizes")
    p.add_argument("--wheels", default=str(REPO / "bench/gpu/wheels"), help="folder of carried wheels")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (480 on a GPU, 900 dry)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers validated (GPU default 8)")
    p.add_argument("--forwards", type=int, default=None, help="forwards validated per trace (GPU default 48)")
    p.add_argument("--no-fork-server", action="store_true",
                   help="start every step in a fresh interpreter (slower: torch is imported by each)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("give --out DIR (or set OUT)")
    sizes = DRY if args.dry_run else GPU
    if args.layers:
        sizes = Sizes(**{**sizes.__dict__, "layers": args.layers})
    if args.forwards:
        sizes = Sizes(**{**sizes.__dict__, "forwards": args.forwards})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (900.0 if args.dry_run else 480.0)
    with tempfile.TemporaryDirectory(prefix="tidesim-gpu-") as tmp:
        run = Run(out=out, work=Path(tmp), sizes=sizes, dry=args.dry_run, budget_s=budget, site=Path(tmp) / "site",
                  fork=not args.no_fork_server)
        results: dict[str, Any] = {}
        step(run, "install", lambda: install(run, Path(args.wheels)))
        write_json(out / "env.json", environment(run))
        tr = step(run, "traces", lambda: traces(run)) or {}
        prof = step(run, "calibrate", lambda: calibrate(run))
        checkpoint(run, results)
        if prof is not None:
            measure_all(run, results, tr, prof)
        table = checkpoint(run, results)
        print(table, end="")
    return 0 if all(s["status"] == "ok" for s in run.steps) else 1


def measure_all(run: Run, results: dict[str, Any], tr: dict[str, str], prof: Path) -> None:
    """Plan, the validations (one process per trace), throughput, live: in order of value, the
    log and summary rewritten after each."""
    sizes = run.sizes
    grid = ["--budgets", ",".join(map(str, sizes.budgets)), "--policies", sizes.policies, "--refresh", "sync,async"]
    plan_path = step(run, "plan", lambda: plan(run, tr["prefix"], prof)) if "prefix" in tr else None
    jobs = [("prefix", "prefix", ["--repeats", str(sizes.repeats)] + (["--plan", str(plan_path)] if plan_path else [])),
            ("none", "none", []),
            ("window", "prefix", ["--window", "after-first-block"])]
    for k, (name, kv, extra) in enumerate(jobs):
        if kv not in tr:
            continue
        share = (0.45, 0.45, 0.35)[k]
        data = step(run, f"validate {name}",
                    lambda name=name, kv=kv, extra=extra, share=share: validate(run, tr[kv], prof, name, grid + extra,
                                                                                share))
        if data is None and (run.out / f"validate_{name}.json").exists():
            data = json.loads((run.out / f"validate_{name}.json").read_text())   # what was kept
        if data is not None:
            results[f"validate_{name}"] = data
        checkpoint(run, results)
    prefix = results.get("validate_prefix")
    if prefix is not None:
        tp = step(run, "throughput", lambda: throughput(run, prefix))
        if tp is not None:
            results["throughput"] = tp
    lv = step(run, "live", lambda: live(run, prof))
    if lv is not None:
        results["live"] = lv
        write_json(run.out / "live.json", lv)


def checkpoint(run: Run, results: dict[str, Any]) -> str:
    """env.json (with every step so far), summary.txt and log.txt as they stand: a run cut off
    from outside still leaves them."""
    env_path = run.out / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else environment(run)
    env["steps"] = run.steps
    env["seconds"] = round(time.monotonic() - run.t0, 1)
    write_json(env_path, env)
    table = summary_table(run, results)
    (run.out / "summary.txt").write_text(table)
    (run.out / "log.txt").write_text("\n".join(run.log_lines) + "\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
