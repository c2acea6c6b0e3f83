"""The layers as a checked contract: pyproject.toml's import-linter contracts hold on this tree
(genrep/ never imports the harness; harness/ imports only downwards; no import cycles), and the
check is not toothless: an upward import and a cycle planted in a copy of the tree break it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=tree, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tree), "PATH": str(LINT.parent)})


def copy_tree(tmp_path: Path) -> Path:
    for pkg in ("genrep", "harness"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_contracts_hold():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    tree = copy_tree(tmp_path)
    with open(tree / "harness" / "step.py", "a") as f:  # the step calling back up to the worker
        f.write("\n\ndef _planted():\n    from harness.worker import train_loop  # noqa\n")
    out = lint(tree)
    assert out.returncode != 0
    # the layers contract names the import; it is also a cycle (worker imports step)
    assert "harness.step -> harness.worker" in out.stdout and "2 broken" in out.stdout, out.stdout


def test_a_cycle_and_a_harness_import_in_genrep_break_the_contracts(tmp_path):
    tree = copy_tree(tmp_path)
    with open(tree / "genrep" / "posterior.py", "a") as f:  # posterior <-> reverse_chain
        f.write("\n\nfrom genrep.reverse_chain import reverse_chain_posterior  # noqa\n")
    with open(tree / "genrep" / "losses.py", "a") as f:
        f.write("\n\nimport harness.config  # noqa\n")
    out = lint(tree)
    assert out.returncode != 0 and "2 broken" in out.stdout, out.stdout
