"""The repository stands alone: no tracked file points to a file outside it (a sibling `shared/`
folder, an absolute workspace path), and docs/sources.md, where the outside facts live with their
public sources, is there and names them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pointers a user's clone cannot follow: a folder beside the checkout, an absolute path into the
# workspace the project was built in, or the name of the notes file that lived there.
OUTSIDE = re.compile(r"\.\./shared\b|/work/shared|/work/main|/work/wt/|shared/reference|\breference\.md\b")
BINARY = (".parquet", ".png", ".pdf", ".gz", ".zip")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def outside_pointers(text: str) -> list[str]:
    return [m.group(0) for m in OUTSIDE.finditer(text)]


def test_pattern_catches_the_pointers_it_is_for():
    parent = "../" + "shared"    # spelled in two parts so that this file does not point there itself
    assert outside_pointers(f"see {parent}/reference.md, docs") == [parent, "reference.md"]
    assert outside_pointers("cat /work/shared/design.md") == ["/work/shared"]
    assert outside_pointers("the shared expert and shared memory; docs/sources.md") == []


def test_no_tracked_file_points_outside_the_repository():
    this = Path(__file__).resolve()
    found = []
    for path in tracked_files():
        if path.resolve() == this or path.suffix in BINARY or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for lineno, line in enumerate(text.splitlines(), start=1):
            for hit in outside_pointers(line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {hit}")
    assert not found, "pointers outside the repository:\n" + "\n".join(found)


def test_sources_page_names_public_sources():
    text = " ".join((ROOT / "docs" / "sources.md").read_text().split())
    for source in ("arXiv 2605.20179", "github.com/ims-kdks/TIDE", "model/modeling_llada2_moe.py",
                   "arXiv 2512.15745", "arXiv 2605.30876"):
        assert source in text, source


def test_hardware_presets_cite_the_sources_page():
    for path in sorted((ROOT / "hwprofiles").glob("*.yaml")):
        text = path.read_text()
        if "kind: datasheet" in text:
            assert "docs/sources.md" in text, path.name
