"""The floors of the code base (docs/architecture.md): the CLI is the top floor, so nothing below
it imports tidesim.cli; and no two library modules import each other, directly or around a loop
(counting imports inside functions, which hide circles rather than remove them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "tidesim", ROOT / "runtime" / "tidesim_runtime"]


def _module_name(root: Path, path: Path) -> str:
    """tidesim/policies/tide.py under `root` -> tidesim.policies.tide (a package's __init__: the package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (a `from package import module`
    counts as the module)."""
    out: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    out.add(f"{target}.{alias.name}")
                elif target in known:
                    out.add(target)
    return out - {name}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(base.parent, p): p for base in PACKAGES for p in base.rglob("*.py")}
    known = set(files)
    return {name: _imports(path, name, known) for name, path in files.items()}


def test_nothing_below_the_cli_imports_it() -> None:
    below = {name: deps for name, deps in _graph().items()
             if not name.startswith("tidesim.cli") and name != "tidesim.__main__"}
    offenders = sorted(f"{name} imports {dep}" for name, deps in below.items() for dep in deps
                       if dep.startswith("tidesim.cli"))
    assert offenders == []


def _circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import loop a depth-first walk meets, as "a -> b -> a"."""
    circles: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return circles


def test_no_import_circles() -> None:
    # A package's __init__ re-exporting its modules is the package's front door, not a dependency
    # of those modules on each other: drop the edges from a package to its own submodules.
    graph = {name: {d for d in deps if not d.startswith(name + ".")} for name, deps in _graph().items()}
    assert _circles(graph) == []


# The library's floors below the CLI (docs/architecture.md), top first: a module imports only from its
# own floor or those below it. A module not listed here (a new one) is not checked until it is placed.
FLOORS: list[tuple[str, list[str]]] = [
    ("jobs", ["tidesim.demo", "tidesim.sweep", "tidesim.report", "tidesim.html_report", "tidesim.demo_figures"]),
    ("evaluate", ["tidesim.evaluate"]),
    ("scenario", ["tidesim.scenario", "tidesim.default_tau"]),
    ("planner", ["tidesim.planner"]),
    ("executors", ["tidesim.run", "tidesim.sim", "tidesim.costmodel"]),
    ("policies", ["tidesim.policies"]),
    ("core", ["tidesim.workload", "tidesim.schedule", "tidesim.schedule_io", "tidesim.layermodel", "tidesim.hardware",
              "tidesim.hardware_parts", "tidesim.curves", "tidesim.models", "tidesim.hf_config", "tidesim.plan",
              "tidesim.metrics", "tidesim.decode", "tidesim.trace", "tidesim.bundled", "tidesim.budget",
              "tidesim.limits", "tidesim.sim.lpt"]),
    ("base", ["tidesim.errors", "tidesim.atomic", "tidesim.formatting", "tidesim.palette", "tidesim.notes",
              "tidesim.lru", "tidesim.procs"]),
]


def _floor(module: str) -> int | None:
    """Index of the floor `module` stands on (the longest matching prefix decides: sim.lpt is core)."""
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def test_no_floor_imports_a_floor_above_it() -> None:
    offenders = []
    for name, deps in _graph().items():
        here = _floor(name)
        if here is None:
            continue
        for dep in sorted(deps):
            there = _floor(dep)
            if there is not None and there < here:
                offenders.append(f"{name} ({FLOORS[here][0]}) imports {dep} ({FLOORS[there][0]})")
    assert offenders == []


def test_the_checker_sees_a_circle_and_a_cli_import(tmp_path: Path) -> None:
    """The import reader on a hand-written package: relative, absolute and in-function imports."""
    pkg = tmp_path / "tidesim"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "cli" / "output.py").write_text("")
    (pkg / "a.py").write_text("from tidesim import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    from tidesim.cli.output import y\n")
    files = {_module_name(tmp_path, p): p for p in pkg.rglob("*.py")}
    known = set(files)
    assert _imports(files["tidesim.a"], "tidesim.a", known) == {"tidesim.b"}
    assert _imports(files["tidesim.b"], "tidesim.b", known) == {"tidesim.a", "tidesim.cli.output"}
    graph = {name: _imports(path, name, known) for name, path in files.items()}
    assert _circles(graph) == ["tidesim.a -> tidesim.b -> tidesim.a"]


# ----- policy names decide nothing outside the registry ------------------------------------------------
# Below tidesim/policies (where each policy registers its own name and traits), code asks the registry
# (traits, policy_names(...), plan_policy(), reference_policy(), static_set_size(...)) instead of
# comparing with a policy's name. A bench that measures named policies against each other by design
# is the one exception.
NAMED_BY_DESIGN = {"bench/bench_tide_split.py", "bench/check_online_identity.py"}
POLICY_ARGUMENT = {"build_schedule", "evaluate", "traits", "entry", "by_policy", "speedup_over",
                   "online_policy", "static_set_size", "plan_runner"}


def _deciding_literals(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each comparison with a registered policy name and each call that passes one
    to a function taking a policy (a budget cap named after the TIDE scripts, `cap == "tide"`, is
    not a policy)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            others = " ".join(ast.unparse(o) for o in operands if not isinstance(o, ast.Constant))
            for sub in operands:
                for leaf in ast.walk(sub):
                    if isinstance(leaf, ast.Constant) and leaf.value in names and "cap" not in others:
                        found.append((node.lineno, leaf.value))
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called in POLICY_ARGUMENT:
                found += [(node.lineno, a.value) for a in node.args if isinstance(a, ast.Constant) and a.value in names]
    return found


def test_no_policy_name_decides_outside_the_registry() -> None:
    from tidesim.policies.registry import policy_names

    names = set(policy_names())
    roots = [ROOT / "tidesim", ROOT / "runtime" / "tidesim_runtime", ROOT / "bench"]
    offenders = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("tidesim/policies/") or rel in NAMED_BY_DESIGN:
                continue
            offenders += [f"{rel}:{line}: {name!r}" for line, name in _deciding_literals(path.read_text(), names)]
    assert offenders == []


def test_the_literal_scan_sees_comparisons_and_calls() -> None:
    names = {"tide", "fiddler", "planned"}
    source = ("if policy == 'tide': pass\n"
              "x = p in ('fiddler', 'other')\n"
              "build_schedule('planned', w, o)\n"
              "ok = cap == 'tide'\n"
              "label = {'tide': 1}\n")
    assert _deciding_literals(source, names) == [(1, "tide"), (2, "fiddler"), (3, "planned")]
