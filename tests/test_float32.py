"""Float32 means float32 on every device: fp32 pins full-precision matmuls and convolutions (no TF32 on CUDA),
the store records the device type it was computed on and refuses rows from another, every extractor takes the
compute dtype from the store's key (not from its own device), and predict warns on another device type."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import extract.features
from common.errors import OptionError
from cache.store import FeatureStore
from common.devices import full_precision, precision_context
from extract.features import FeatureExtractor
from extract.plan import check_device_type
from extract.run import ExtractConfig, run_extract
from train.fit import FitConfig, fit
from train.inference.predictor import Predictor

from helpers import quiet


def precision_flags() -> tuple:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_fp32_on_cuda_is_full_precision_and_restored() -> None:
    before = precision_flags()
    assert before[1] == "tf32"  # torch's default: cuDNN convolutions in TF32
    for context in (full_precision(torch.device("cuda")), precision_context(torch.device("cuda", 1), "fp32")):
        with context:
            assert precision_flags() == ("ieee", "ieee")
        assert precision_flags() == before
    with full_precision(torch.device("cpu")):
        assert precision_flags() == before  # a CPU changes nothing


def config(adm: Path, cache: Path, **kw) -> ExtractConfig:
    return ExtractConfig(dataset="synthetic", unet=str(adm / "adm_tiny.pt"), unet_flags=adm / "adm_tiny_flags.json",
                         text_encoder="minilm", size=32, steps=(50,), blocks=(4,), cache_dir=cache, device="cpu",
                         dataset_options={"counts": {"train": 3, "val": 1, "test": 2}}, **kw)


def test_the_extractor_computes_in_the_store_keys_dtype(tiny_unet: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store made with --autocast on a CPU says bfloat16; a later run that adds a pair computes in bfloat16 even
    where this device's autocast default is another (a GPU's float16), as a cluster worker on another device."""
    store = run_extract(config(tiny_unet, tmp_path, autocast=True), console=quiet())
    assert FeatureStore.open(store).key["compute_dtype"] == "bfloat16"
    used: list[torch.dtype] = []
    real = FeatureExtractor.samples
    monkeypatch.setattr(FeatureExtractor, "samples", lambda self, *a, **k: (used.append(self.compute_dtype),
                                                                            real(self, *a, **k))[1])
    monkeypatch.setattr(extract.features, "autocast_dtype", lambda device: torch.float16)
    assert run_extract(replace(config(tiny_unet, tmp_path, autocast=True), steps=(250,)), console=quiet()) == store
    assert used and set(used) == {torch.bfloat16}
    assert FeatureExtractor(torch.nn.Module(), torch.zeros(1), compute_dtype=torch.float32).autocast is False


def test_the_store_records_its_device_type_and_refuses_another(tiny_unet: Path, tmp_path: Path) -> None:
    path = run_extract(config(tiny_unet, tmp_path), console=quiet())
    store = FeatureStore.open(path)
    assert store.attrs["device_type"] == "cpu"
    check_device_type(store, torch.device("cpu"))
    with pytest.raises(OptionError, match="computed on cpu, this run would compute on cuda") as e:
        check_device_type(store, torch.device("cuda", 0))
    assert e.value.option == "device"


def test_predict_warns_on_another_device_type(tiny_unet: Path, tmp_path: Path) -> None:
    path = run_extract(config(tiny_unet, tmp_path), console=quiet())
    run = tmp_path / "run"
    fit(FitConfig.flat(cache=path, out=run, epochs=1, dim=16, head_channels=(8, 4)), console=quiet())
    predictor = Predictor.from_run(run, device="cpu")
    assert predictor.stage_one.device_type == "cpu" and predictor.device_note() is None
    elsewhere = dataclasses.replace(predictor, stage_one=dataclasses.replace(predictor.stage_one, device_type="cuda"))
    note = elsewhere.device_note()
    assert note and "computed its features on cuda, this prediction runs on cpu" in note
    older = dataclasses.replace(predictor, stage_one=dataclasses.replace(predictor.stage_one, device_type=None))
    assert older.device_note() is None  # a store that records none: nothing to compare
