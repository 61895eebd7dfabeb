"""The docs cannot drift from the code: every `tidesim` command in a ```sh block of README.md or
docs/*.md runs and exits 0. A command marked `# slow` (minutes of work) is only parsed, so its
flags must still exist. A comment line `# -> TEXT` right under a command is output the doc shows:
the command's output must contain TEXT. Commands run in a scratch folder, with the repository's traces/, hwprofiles/
and docs/ reachable under the same relative names."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tidesim.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```sh\n(.*?)```", re.S)


def doc_commands(doc: Path) -> list[tuple[str, bool, list[str]]]:
    """(command, slow, the output lines the doc shows for it) per command."""
    out: list[tuple[str, bool, list[str]]] = []
    for block in BLOCK.findall(doc.read_text()):
        for raw in block.splitlines():
            line = raw.strip()
            if line.startswith("tidesim "):
                out.append((line.split(" #", 1)[0].strip(), line.endswith("# slow"), []))
            elif line.startswith("# -> ") and out:
                out[-1][2].append(line[len("# -> "):])
    return out


DOCS_WITH_COMMANDS = [d for d in DOCS if doc_commands(d)]


def test_docs_have_commands():
    assert sum(len(doc_commands(d)) for d in DOCS) >= 10


@pytest.mark.parametrize("doc", DOCS_WITH_COMMANDS, ids=[d.name for d in DOCS_WITH_COMMANDS])
def test_doc_commands_run(doc, tmp_path):
    """A doc's commands run in order in one scratch folder (later ones may use earlier outputs)."""
    for name in ("traces", "hwprofiles", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for command, slow, shown in doc_commands(doc):
        argv = shlex.split(command)[1:]
        if slow:
            assert not shown, f"{doc.name}: `{command}` is marked slow but shows output to check"
            build_parser().parse_args(argv)
            continue
        proc = subprocess.run([sys.executable, "-m", "tidesim", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, f"{doc.name}: `{command}` exited {proc.returncode}: {proc.stderr[-500:]}"
        for text in shown:
            assert text in proc.stdout + proc.stderr, f"{doc.name}: `{command}` no longer prints {text!r}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_local_links_resolve(doc):
    """Every relative Markdown link in README.md and docs/ points at a file that exists."""
    missing = [target for target in LINK.findall(doc.read_text())
               if "://" not in target and not (doc.parent / target).exists()]
    assert not missing, f"{doc.name}: broken links {missing}"
