"""The `fura` command imports only the subcommand it runs, and a subcommand module that is not installed is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fura import cli

SUBCOMMAND_MODULES = [module for module, _ in (*cli.COMMANDS.values(), *cli.EVALS.values(), *cli.EXPERIMENTS.values())]

# In a fresh interpreter: run `fura ARGV` for each ARGV in turn (each a --help, which exits 0), and list the
# subcommand modules imported after each.
PROBE = """
import json, sys
from fura.cli import main
modules, argvs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
imported = []
for argv in argvs:
    try:
        main(argv)
    except SystemExit as exit_:
        assert exit_.code == 0, exit_.code
    imported.append([m for m in modules if m in sys.modules])
print(json.dumps(imported))
"""


def test_help_imports_only_the_subcommand_it_shows():
    assert "fura.recipes.train" in SUBCOMMAND_MODULES and "fura.evaluation.math" in SUBCOMMAND_MODULES
    argvs = [["--help"], ["eval", "--help"], ["-v", "eval", "math", "--help"]]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(SUBCOMMAND_MODULES), json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [[], [], ["fura.evaluation.math"]]


@pytest.fixture
def absent_command(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "absent", ("fura.not_installed_here", "a module this installation lacks"))


def test_a_subcommand_whose_module_is_absent_is_one_line(absent_command, capsys):
    assert cli.main(["absent"]) == 2
    err = capsys.readouterr().err
    assert err == "fura: error: fura.not_installed_here is not available in this installation\n"


def test_a_module_that_fails_to_import_keeps_its_traceback(monkeypatch, tmp_path):
    """Only the subcommand's own module may be missing; a missing import inside it is a bug, not a user error."""
    (tmp_path / "broken_subcommand.py").write_text("import fura_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "broken", ("broken_subcommand", "imports what is not there"))
    with pytest.raises(ModuleNotFoundError, match="fura_no_such_dependency"):
        cli.main(["broken"])
