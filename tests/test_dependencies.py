"""The dependency list a user's environment can live with: pyproject.toml declares torch as a range with a
lower bound (so `pip install textdiff` keeps a CUDA torch already installed), the installed torch lies in it,
and the exact pin lives where it belongs: the Makefile's install step for our CPU machines."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _torch_requirement() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert len(found) == 1, deps
    return found[0]


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", ">", "~=")]
    assert floors, f"torch has no lower bound in pyproject.toml: {req}"
    return max(floors)


def test_torch_is_a_range_with_a_lower_bound_not_a_pin() -> None:
    req = _torch_requirement()
    assert not [s for s in req.specifier if s.operator in ("==", "===")], f"torch is pinned: {req}"
    assert _floor(req) >= Version("2.6"), req  # transformers >= 5 disables an older torch
    assert not [s for s in req.specifier if s.operator in ("<", "<=")], f"no upper bound either: {req}"


def test_installed_torch_satisfies_the_declared_range() -> None:
    req = _torch_requirement()
    installed = Version(torch.__version__.split("+")[0])
    assert req.specifier.contains(installed, prereleases=True), f"torch {torch.__version__} is outside {req}"
    assert installed >= _floor(req)


def test_the_exact_pin_is_the_makefiles_and_lies_in_the_range() -> None:
    makefile = (REPO / "Makefile").read_text()
    pins = re.findall(r"^TORCH\s*:?=\s*torch==(\S+)\s*$", makefile, flags=re.M)
    assert len(pins) == 1, "the Makefile pins torch exactly once (TORCH := torch==X.Y.Z)"
    assert re.search(r"pip install -q \$\(TORCH\)\n\t.*pip install -q -e \.", makefile), "torch first, then ."
    assert _torch_requirement().specifier.contains(Version(pins[0]))
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Installing on a GPU machine", 1)
    assert len(section) == 2 and "pip install -e ." in section[1].split("\n## ", 1)[0], \
        "README says how to install on a GPU machine (its own CUDA torch first, then the package)"
