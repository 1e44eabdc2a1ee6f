"""Shared fixtures: a tiny seeded ADM UNet built here, and the ../shared folder beside the checkout.

Every test runs from a bare clone except those that need ``../shared`` (or ``$TEXTDIFF_SHARED``): the parity
tests against guided-diffusion's own numbers (``adm_fixtures``) and the real-data tests (``monuseg_root``,
``qata_root``, ``shared_dir``). Collection marks them ``shared``; count them with
``pytest --collect-only -q -m "shared and not slow"`` (a run's header says whether ../shared is there, its summary
how many of the tests that ran needed it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEXTDIFF_SHARED", REPO.parent / "shared"))
SHARED_FIXTURES = ("shared_dir", "adm_fixtures", "monuseg_root", "qata_root")
REQUIRE_SHARED = os.environ.get("TEXTDIFF_REQUIRE_SHARED") == "1"  # set by .ci/run: CI never passes with them skipped

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Before torch loads its OpenMP runtime (here and in every subprocess a test starts): idle threads sleep instead of
# spinning. On 2 cores shared with anything else (a neighbour, a fit beside the suite) spinning threads made a
# UNet forward 60x slower (bench/extract.py's quick run: 5.7 s against 0.15 s), and CI's suite ran past 15 min.
# It changes only how threads wait, never a number.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The flags of ../shared/fixtures/adm/adm_tiny_flags.json (test_unet.py checks that they still agree):
# 64x64 input, channel_mult 1,1,2,2, attention at 16 and 8, 16 channels per head, learn_sigma.
TINY_UNET_FLAGS = {
    "image_size": 64, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,1,2,2", "learn_sigma": True,
    "class_cond": False, "attention_resolutions": "16,8", "num_heads": 4, "num_head_channels": 16,
    "num_heads_upsample": -1, "use_scale_shift_norm": True, "dropout": 0.0, "resblock_updown": True,
    "use_new_attention_order": False, "use_fp16": False,
}


def _need(path: Path) -> Path:
    if not path.exists():
        reason = f"{path} is absent: parity and real-data tests expect ../shared beside the checkout"
        if REQUIRE_SHARED:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``shared`` every test that reaches ../shared through a fixture (directly or through another)."""
    for item in items:
        if set(getattr(item, "fixturenames", ())) & set(SHARED_FIXTURES):
            item.add_marker(pytest.mark.shared)
            item.user_properties.append(("shared", True))  # reaches the summary from xdist's workers too


def _where() -> str:
    if SHARED.exists():
        return "present"
    return "ABSENT: they fail" if REQUIRE_SHARED else "ABSENT: they skip"


def pytest_report_header(config: pytest.Config) -> str:
    """The header, in a serial run and in xdist's controller alike (workers collect; the controller does not)."""
    return f"tests marked shared need {SHARED} ({_where()})"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """How many of the tests that ran needed ../shared: counted from their reports, which xdist's workers send."""
    tests = {r.nodeid: ("shared", True) in r.user_properties for reports in terminalreporter.stats.values()
             for r in reports if isinstance(r, pytest.TestReport)}  # not warnings, not deselected items
    ran, shared = len(tests), sum(tests.values())
    if ran:
        terminalreporter.write_line(f"{shared} of {ran} tests that ran needed {SHARED} ({_where()})")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def adm_fixtures() -> Path:
    """guided-diffusion's reference outputs (and the tiny checkpoint they were computed with): parity tests only."""
    return _need(SHARED / "fixtures" / "adm")


@pytest.fixture(scope="session")
def monuseg_root() -> Path:
    return _need(SHARED / "data" / "MoNuSeg")


@pytest.fixture(scope="session")
def qata_root() -> Path:
    return _need(SHARED / "data" / "QaTa-COV19")


def build_tiny_unet(folder: Path, seed: int = 0) -> Path:
    """A tiny ADM UNet with seeded random values in every parameter, saved as the public checkpoints are.

    Writes ``adm_tiny.pt`` (``torch.save(state_dict)``) and ``adm_tiny_flags.json`` into ``folder``, the layout
    of ``../shared/fixtures/adm``; the weights are not that file's. Like the fixture, no layer is left at zero
    (guided-diffusion zero-initialises output convolutions, which would make every residual block an
    identity): weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.01), biases ~ N(0, 1).
    """
    import torch

    from extract.unet import create_unet

    with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
        torch.manual_seed(seed)
        model = create_unet(**TINY_UNET_FLAGS)
        with torch.no_grad():
            for module in model.modules():
                for name, p in module.named_parameters(recurse=False):
                    if p.dim() >= 2:
                        p.normal_(0.0, p[0].numel() ** -0.5)
                    elif name == "weight" and isinstance(module, torch.nn.GroupNorm):
                        p.normal_(1.0, 0.1)
                    else:
                        p.normal_(0.0, 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "adm_tiny.pt")
    (folder / "adm_tiny_flags.json").write_text(json.dumps(TINY_UNET_FLAGS, indent=1))
    return folder


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``adm_tiny.pt`` and ``adm_tiny_flags.json``: a tiny seeded UNet built for this session."""
    return build_tiny_unet(tmp_path_factory.mktemp("tiny_unet"))


@pytest.fixture(scope="module")
def store_path(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic store of the tiny UNet (:func:`helpers.tiny_store`), one per test module."""
    from helpers import tiny_store

    return tiny_store(tiny_unet, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
