"""The docs cannot drift from the code: every `tidesim` command in a ```sh block of README.md or
docs/*.md runs and exits 0. A command marked `# slow` (minutes of work) is only parsed, so its
flags must still exist. Commands run in a scratch folder, with the repository's traces/, hwprofiles/
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


def doc_commands() -> list[tuple[str, str, bool]]:
    out = []
    for doc in DOCS:
        for block in BLOCK.findall(doc.read_text()):
            for raw in block.splitlines():
                line = raw.strip()
                if not line.startswith("tidesim "):
                    continue
                slow = line.endswith("# slow")
                command = line.split(" #", 1)[0].strip()
                out.append((doc.name, command, slow))
    return out


COMMANDS = doc_commands()


def test_docs_have_commands():
    assert len(COMMANDS) >= 5


@pytest.mark.parametrize("doc, command, slow", COMMANDS, ids=[f"{d}: {c}"[:90] for d, c, _ in COMMANDS])
def test_doc_command_runs(doc, command, slow, tmp_path):
    argv = shlex.split(command)[1:]
    if slow:
        build_parser().parse_args(argv)
        return
    for name in ("traces", "hwprofiles", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "tidesim", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"{doc}: `{command}` exited {proc.returncode}: {proc.stderr[-500:]}"
