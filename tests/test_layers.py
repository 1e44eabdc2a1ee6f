"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they catch a broken layer.

Layers (docs/design.md §2): cache ← extract ← train ← pipeline, an arrow pointing at what may be imported;
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
PACKAGES = ("cache", "extract", "train")
CONTRACTS = ("layers", "cli-on-top", "acyclic")


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


# (file that gets the extra import, the import, the contract it breaks, what the report must name)
VIOLATIONS = {
    "cache-imports-extract": ("cache/key.py", "import extract.unet", "layers", "cache.key -> extract.unet"),
    "extract-imports-train": ("extract/diffusion.py", "from train import metrics", "layers",
                              "extract.diffusion -> train.metrics"),
    "train-imports-pipeline": ("train/metrics.py", "import pipeline", "cli-on-top", "train.metrics -> pipeline"),
    "cycle-in-cache": ("cache/key.py", "import cache.store", "acyclic", "No cycles are allowed in cache"),
}


@pytest.mark.parametrize("case", VIOLATIONS)
def test_a_broken_contract_fails_and_names_the_import(skeleton: Path, case: str, tmp_path: Path) -> None:
    module, line, contract, names = VIOLATIONS[case]
    root = tmp_path / "checkout"
    shutil.copytree(skeleton, root)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # a throwaway violation\n")
    res = lint_imports(root, contract)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "BROKEN" in res.stdout and names in res.stdout, res.stdout
