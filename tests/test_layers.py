"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they catch a broken layer.

Layers (docs/architecture.md): common ← cache ← extract ← train ← pipeline, an arrow pointing at what may be imported;
no import cycles between the modules of a package. Checked by import-linter, as ``lint-imports`` does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import importlinter  # noqa: F401 - a test dependency (pyproject's `test` extra): missing, this file fails
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "cache", "extract", "train")
CONTRACTS = ("layers", "train-jobs", "cli-on-top", "acyclic")


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the checkout at ``root`` (its pyproject.toml, its packages first on the path)."""
    args = ["--no-cache", "--no-logo", *(a for c in contracts for a in ("--contract", c))]
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("contract", CONTRACTS)
def test_the_code_keeps_its_import_contract(contract: str) -> None:
    res = lint_imports(REPO, contract)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "KEPT" in res.stdout and "BROKEN" not in res.stdout, res.stdout


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packages, pipeline.py and pyproject.toml (the contracts), to break one import in."""
    root = tmp_path_factory.mktemp("skeleton")
    for name in PACKAGES:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pipeline.py", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    return root


# new modules dropped into the copy (so the cases survive modules being moved), the contract they break,
# and what its report must name
VIOLATIONS = {
    "common-imports-cache": ({"common/_throwaway.py": "import cache"}, "layers", "common._throwaway -> cache"),
    "cache-imports-extract": ({"cache/_throwaway.py": "import extract"}, "layers", "cache._throwaway -> extract"),
    "extract-imports-train": ({"extract/_throwaway.py": "import train"}, "layers", "extract._throwaway -> train"),
    "a-net-imports-a-job": ({"train/nets/_throwaway.py": "import train.fit"}, "train-jobs",
                            "train.nets._throwaway -> train.fit"),
    "a-reader-imports-the-registry": ({"train/data/_throwaway.py": "import train.registry"}, "train-jobs",
                                      "train.data._throwaway -> train.registry"),
    "train-imports-pipeline": ({"train/_throwaway.py": "import pipeline"}, "cli-on-top",
                               "train._throwaway -> pipeline"),
    "cycle-in-cache": ({"cache/_a.py": "import cache._b", "cache/_b.py": "import cache._a"}, "acyclic",
                       "No cycles are allowed in cache"),
}


@pytest.mark.parametrize("case", VIOLATIONS)
def test_a_broken_contract_fails_and_names_the_import(skeleton: Path, case: str, tmp_path: Path) -> None:
    files, contract, names = VIOLATIONS[case]
    root = tmp_path / "checkout"
    shutil.copytree(skeleton, root)
    for name, line in files.items():
        (root / name).write_text(f"{line}  # a throwaway violation\n")
    res = lint_imports(root, contract)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "BROKEN" in res.stdout and names in res.stdout, res.stdout
