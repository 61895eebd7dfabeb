"""The report page (index.html): self-contained, escaped, deterministic, and in a real browser
every figure loads and the tables are there."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest
from browser import check_page, dump_dom
from simkit import profile, trace

from tidesim.cli import main
from tidesim.html_report import Link, Report, Section, Table, render, timeline_link, write_report
from tidesim.trace.io import write_trace

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def png(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def report(folder: Path) -> Report:
    png(folder / "a.png")
    (folder / "t.json").write_text("{}")
    return Report("title <x>", intro=["intro & more"], sections=[
        Section("one", paragraphs=["p <b>"], tables=[Table(["name", "value"], [["<script>", 1.5], ["n", float("nan")]],
                                                          "cap")],
                figures=["a.png"], links=[timeline_link("t.json")]),
        Section("two", links=[Link("sub dir/x.parquet", "x", "hint")])])


def test_page_embeds_pngs_escapes_text_and_links_files(tmp_path: Path) -> None:
    text = write_report(report(tmp_path), tmp_path).read_text()
    assert text.startswith("<!DOCTYPE html>") and (tmp_path / "index.html").exists()
    assert "data:image/png;base64," in text and 'href="a.png"' in text
    assert "&lt;script&gt;" in text and "<script>\n" in text and text.count("<script>") == 1
    assert "title &lt;x&gt;" in text and "intro &amp; more" in text
    assert '<td class="num">1.500</td>' in text and "<td>-</td>" in text          # NaN shows as '-'
    assert 'href="t.json"' in text and "ui.perfetto.dev" in text and 'href="sub dir/x.parquet"' in text
    # nothing is fetched: no src or stylesheet that is not embedded
    assert not re.search(r'src="(?!data:)', text) and "<link" not in text


def test_page_is_deterministic_and_names_missing_figures(tmp_path: Path) -> None:
    r = report(tmp_path)
    assert render(r, tmp_path) == render(r, tmp_path)
    r.sections[0].figures.append("missing.svg")
    assert '<img src="missing.svg"' in render(r, tmp_path)


def test_browser_loads_every_figure_and_table(tmp_path: Path) -> None:
    page = write_report(report(tmp_path), tmp_path)
    dom = check_page(page, tmp_path / "profile", figures=1, tables=1)
    assert "intro &amp; more" in dom


def test_browser_marks_a_figure_that_does_not_load(tmp_path: Path) -> None:
    r = report(tmp_path)
    r.sections[0].figures.append("missing.png")
    page = write_report(r, tmp_path)
    dom = dump_dom(page, tmp_path / "profile")
    assert 'data-figures="2 1"' in dom and "figure did not load: missing.png" in dom


def test_compare_figure_page_in_a_browser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    counts = [[[1, 1, 2, 0], [0, 2, 1, 1]], [[2, 2, 0, 0], [1, 1, 1, 1]]]
    tr = write_trace(trace(counts), tmp_path / "tiny.parquet")
    hw = tmp_path / "round.yaml"
    profile(workers=2).save(hw)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["compare", "--trace", str(tr), "--hw", str(hw), "--budget", "2", "--figure",
                 str(out / "cmp.png")]) == 0
    assert "report page:" in capsys.readouterr().out
    page = out / "cmp.html"
    dom = check_page(page, tmp_path / "profile", figures=1, tables=2)
    for policy in ("full-swap", "cpu-routing", "tide", "oracle"):
        assert f"<td>{policy}</td>" in dom
