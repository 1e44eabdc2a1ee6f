"""Shared fixtures: the ../shared folder beside the checkout (data and reference fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEXTDIFF_SHARED", REPO.parent / "shared"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: tests that use real data expect ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def adm_fixtures() -> Path:
    return _need(SHARED / "fixtures" / "adm")


@pytest.fixture(scope="session")
def monuseg_root() -> Path:
    return _need(SHARED / "data" / "MoNuSeg")


@pytest.fixture(scope="session")
def qata_root() -> Path:
    return _need(SHARED / "data" / "QaTa-COV19")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
