import json
import subprocess
import sys

import pytest

from tidesim.cli import build_parser, main


def all_command_paths():
    parser = build_parser()
    paths = []

    def walk(p, prefix):
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    paths.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(parser, [])
    return paths


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p))
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_is_exit_2_one_line(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err


def test_hw_list_json(capsys):
    assert main(["hw", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"h100-sxm-pcie5", "a100-80gb-pcie4"}


def test_hw_show_table_and_bad_name(capsys):
    assert main(["hw", "show", "h100-sxm-pcie5"]) == 0
    out = capsys.readouterr().out
    assert "provenance: datasheet" in out and "llada2-flash" in out
    assert main(["hw", "show", "missing-profile"]) == 2


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "tidesim", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("tidesim ")
