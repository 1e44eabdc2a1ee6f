"""Device paths that hold on a GPU machine, checked on the CPU: a CPU fit touches no CUDA state, determinism
settings are restored after a fit, a checkpoint keeps one device's random state, features travel as float16,
the position code is made once per shape, pretraining times its iterations after a device sync."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import train.nets.head
from common.devices import deterministic_kernels
from extract.pretrain import PretrainConfig, pretrain
from train.runs import rundir
from train.data.readers import SplitFeatures
from train.fit import FitConfig, fit
from train.nets.head import TextDiffHead
from train.runs.resume import FitState, checkpoint_state, restore

from helpers import quiet


def tiny_fit(store: Path, out: Path, **kw) -> FitConfig:
    return FitConfig.flat(**{"cache": store, "out": out, "epochs": 1, "dim": 16, "head_channels": (8, 4),
                             "device": "cpu", **kw})


def test_a_cpu_fit_on_a_machine_with_cuda_leaves_cuda_alone(store_path: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As if CUDA were there: any CUDA initialisation fails the test; the checkpoint keeps no CUDA state."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU fit initialised CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    saved = []
    monkeypatch.setattr(rundir, "save_checkpoint", lambda run, state: saved.append(state))
    fit(tiny_fit(store_path, tmp_path / "run"), console=quiet())
    assert saved and saved[-1]["cuda_rng"] == [] and not torch.cuda.is_initialized()


def test_a_checkpoint_keeps_one_devices_cuda_state_and_restores_it_there() -> None:
    """A GPU checkpoint holds its own device's state; restored on a CPU (or a machine with fewer GPUs) the
    rest is ignored, and an older checkpoint's list of every GPU's state gives the fit's device the first."""
    model = torch.nn.Linear(2, 2)
    optim = torch.optim.Adam(model.parameters())
    schedule = torch.optim.lr_scheduler.MultiStepLR(optim, milestones=[], gamma=0.1)
    cfg = FitConfig.flat(cache="s", out="o")

    class Store:
        key = {"k": 1}

    state = checkpoint_state(FitState(), model, optim, schedule, np.random.default_rng(0), cfg, Store())
    assert state["cuda_rng"] == []
    state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)] * 3  # a checkpoint of a 3-GPU machine's older layout
    restore(state, model, optim, schedule, np.random.default_rng(0))  # on the CPU: nothing asked of CUDA


def test_determinism_settings_are_restored_after_a_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # no GPU here
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    with deterministic_kernels(torch.device("cuda", 1)):
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled()) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with pytest.raises(KeyboardInterrupt), deterministic_kernels(torch.device("cuda")):
        raise KeyboardInterrupt  # an interrupted fit restores them too
    assert torch.are_deterministic_algorithms_enabled() == before[2]
    with deterministic_kernels(torch.device("cpu")):  # a CPU fit changes nothing
        assert (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == \
            (before[0], before[2])


def test_features_travel_as_float16_and_are_converted_on_the_device(store_path: Path) -> None:
    from cache.store import FeatureStore

    data = SplitFeatures(FeatureStore.open(store_path), "train", (4, 8), (50, 250))
    half, full = data.batch([0, 1], [0, 0], half=True), data.batch([0, 1], [0, 0])
    assert all(f.dtype == torch.float16 for f in half.feats) and all(f.dtype == torch.float32 for f in full.feats)
    moved = half.to(torch.device("cpu"))
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(moved.feats, full.feats))


def test_the_position_code_is_computed_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    code = train.nets.head.sinusoidal_2d
    monkeypatch.setattr(train.nets.head, "sinusoidal_2d", lambda h, w, *a: (calls.append((h, w)), code(h, w, *a))[1])
    torch.manual_seed(0)
    head = TextDiffHead([6, 6], text_dim=8, dim=16, heads=2, head_dim=8, head_channels=(4,), pos_enc=True)
    head.init_weights()
    feats, tokens, mask = [torch.randn(1, 6, 4, 4), torch.randn(1, 6, 8, 8)], torch.randn(1, 3, 8), \
        torch.ones(1, 3, dtype=torch.bool)
    first = head(feats, tokens, mask, out_size=16)
    for impl in ("fast", "literal", "fast"):
        with torch.inference_mode():
            again = head(feats, tokens, mask, out_size=16, impl=impl)
    assert sorted(calls) == [(4, 4), (8, 8)]
    torch.testing.assert_close(again, first.detach(), rtol=0, atol=0)
    first.sum().backward()  # a code first made under inference mode still trains


def test_pretraining_times_each_iteration_after_a_device_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import extract.pretrain

    flags = tmp_path / "tiny.json"
    flags.write_text(json.dumps({"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                                 "attention_resolutions": "8", "num_head_channels": 16, "learn_sigma": False}))
    synced: list[torch.device] = []
    monkeypatch.setattr(extract.pretrain, "synchronize", synced.append)
    cfg = PretrainConfig(dataset="synthetic", out=tmp_path / "pre", size=32, flags=str(flags), iterations=3,
                         batch_size=2, checkpoint_every=3, samples=1, sample_steps=2,
                         dataset_options={"counts": {"train": 4, "val": 1, "test": 1}}, device="cpu")
    pretrain(replace(cfg), console=quiet())
    assert synced == [torch.device("cpu")] * 3
