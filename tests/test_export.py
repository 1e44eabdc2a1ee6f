"""export: a run as a model folder (config.json, model.safetensors, a Hub model card) that predicts without the
store what the run predicts, refuses a UNet with other bytes, and loads with safetensors alone; the card's fit
command is the run's; no torch.load without weights_only=True anywhere."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import pipeline
from common.errors import OptionError
from cache.store import FeatureStore, StoreError
from train.runs import rundir
from train.config import FitConfig
from train.evaluate import evaluate
from extract.checkpoints import UNetNotFoundError
from train.export import export_run, fit_command, push_model_dir, shareable_command
from train.fit import fit
from train.inference.predictor import Predictor
from train.runs.stage_one import WeightsMismatchError
from train.inference.batch import predict_batch

from helpers import error_line, quiet, tiny_store_own_unet

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny store made from a copy of the fixture UNet, a run fitted on it and evaluated on test, the run
    exported, and the store's test images as PNGs."""
    root = tmp_path_factory.mktemp("export")
    store, ckpt = tiny_store_own_unet(tiny_unet, root)
    run = root / "run"
    fit(FitConfig.flat(cache=store, out=run, epochs=2, dim=16, head_channels=(8, 4), pos_enc=True), console=quiet())
    evaluate(run, overlays=False, console=quiet())
    res = runner.invoke(pipeline.app, ["export", str(run), "--out", str(root / "model")])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(root / "model")
    opened = FeatureStore.open(store)
    images = root / "images"
    images.mkdir()
    from PIL import Image

    for i, image_id in enumerate(opened.ids("test")):
        pixels = np.asarray(opened.images("test")[i, 0].compute()).transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(images / f"{image_id}.png")
    texts = root / "texts.csv"
    texts.write_text("image,text\n" + "".join(f'{i}.png,"{t}"\n' for i, t in zip(opened.ids("test"),
                                                                                opened.texts("test"))))
    return {"root": root, "store": store, "run": run, "model": root / "model", "ckpt": ckpt, "images": images,
            "texts": texts}


def test_folder_layout_and_weights_load_with_safetensors_alone(tiny: dict) -> None:
    from safetensors.numpy import load_file

    model = tiny["model"]
    assert sorted(p.name for p in model.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    weights = load_file(model / "model.safetensors")  # numpy only: no torch, no pickle
    head = rundir.load_weights(tiny["run"])
    assert weights.keys() == head.keys()
    for name, tensor in head.items():
        np.testing.assert_array_equal(weights[name], tensor.numpy(), err_msg=name)
    config = json.loads((model / "config.json").read_text())
    key = FeatureStore.open(tiny["store"]).key
    assert config["format"] == "textdiff-model" and config["model"] == "textdiff"
    assert config["head"]["pos_enc"] is True and config["blocks"] == [4, 8] and config["steps"] == [50, 250]
    assert config["preprocessing"] == key["preprocessing"]
    assert config["unet"] == {"file": "adm_tiny.pt", "preset": None, **key["unet"]}  # name, flags, sha256: no path
    assert config["text_encoder"] == {"source": "minilm", **key["text"]}
    assert config["forward_batch"] == 4 and config["noise_seed"] == key["noise_seed"]
    assert "cache" not in config and "cache" not in config["fit"] and "out" not in config["fit"]


def test_model_card_front_matter_and_metrics(tiny: dict) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(tiny["model"] / "README.md")  # a local file: the Hub's own parser of the front matter
    data = card.data.to_dict()
    assert data["library_name"] == "textdiff" and data["license"] == "other"
    assert data["datasets"] == ["synthetic"] and data["pipeline_tag"] == "image-segmentation"
    summary = json.loads((tiny["run"] / "eval-test" / "summary.json").read_text())
    results = data["model-index"][0]["results"]
    dice = next(r for r in results if r["metrics"][0]["type"] == "dice")
    assert dice["dataset"]["split"] == "test" and dice["metrics"][0]["value"] == round(summary["dice"], 6)
    text = card.text
    assert f"{100 * summary['dice']:.2f}" in text and "pipeline evaluate <run> --split test" in text
    assert "pipeline extract" in text and "--pos-enc" in text and "Intended use and limits" in text
    config = json.loads((tiny["run"] / "config.json").read_text())
    assert all(f"`{i}`" in text for i in config["train_ids"])


def test_predict_model_dir_without_the_store_equals_the_run(tiny: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(tiny["ckpt"].parent))  # where the model folder finds its UNet
    from_run = predict_batch(tiny["run"], tiny["images"], tmp_path / "run", tiny["texts"], probabilities=True,
                             device="cpu", console=quiet())
    store, moved = Path(tiny["store"]), tmp_path / "elsewhere.zarr"
    shutil.move(store, moved)  # no feature store anywhere the run recorded
    try:
        with pytest.raises(StoreError, match="no feature store there"):
            Predictor.from_run(tiny["run"], device="cpu")
        from_dir = predict_batch(tiny["model"], tiny["images"], tmp_path / "dir", tiny["texts"], probabilities=True,
                                 device="cpu", console=quiet())
    finally:
        shutil.move(moved, store)
    assert from_run.written == from_dir.written == len(list(tiny["images"].iterdir()))
    for f in sorted((tmp_path / "run").iterdir()):
        if f.name != "predict.json":
            assert f.read_bytes() == (tmp_path / "dir" / f.name).read_bytes(), f.name
    # the same model: the folders' settings agree, so either may continue the other's outputs
    assert (tmp_path / "run" / "predict.json").read_text() == (tmp_path / "dir" / "predict.json").read_text()


def test_model_dir_refuses_a_unet_with_other_bytes(tiny: dict, tmp_path: Path) -> None:
    altered = tmp_path / "other.pt"
    original = tiny["ckpt"].read_bytes()
    altered.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    recorded = json.loads((tiny["model"] / "config.json").read_text())["unet"]["weights_sha256"]
    with pytest.raises(WeightsMismatchError, match="other.pt") as info:
        Predictor.from_run(tiny["model"], device="cpu", unet=str(altered))
    message = str(info.value)
    assert recorded in message and "config.json" in message and "\n" not in message
    res = runner.invoke(pipeline.app, ["predict", str(tiny["model"]), "--image", str(next(tiny["images"].iterdir())),
                                       "--text", "two lesions", "--out", str(tmp_path / "m.png"), "--unet", str(altered)])
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith("error: UNet checkpoint"), res.output
    with pytest.raises(OptionError, match="needs no store"):
        Predictor.from_run(tiny["model"], tiny["store"], device="cpu")


def test_push_offline_is_refused_in_one_line(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "model"
    res = runner.invoke(pipeline.app, ["export", str(tiny["run"]), "--out", str(out), "--push", "someone/textdiff"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: --push: HF_HUB_OFFLINE"), res.output
    assert not out.exists()  # refused before any work


class _FakeHub:
    """Records what HfApi is asked to do; ``fail`` makes the upload raise as a network error would."""
    calls: list[tuple] = []
    fail = False

    def create_repo(self, repo_id: str, **kw: object) -> None:
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw: object) -> None:
        if self.fail:
            raise ConnectionError("Max retries exceeded\nwith url: https://huggingface.co")
        self.calls.append(("upload_folder", kw))


@pytest.mark.parametrize("fail", [False, True])
def test_push_uploads_the_folder_where_a_network_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_FakeHub, "calls", [])
    monkeypatch.setattr(_FakeHub, "fail", fail)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if fail:
        with pytest.raises(OSError) as info:
            push_model_dir(folder, "someone/textdiff")
        message = str(info.value)
        assert "\n" not in message and "someone/textdiff" in message and str(folder) in message
        assert "ConnectionError: Max retries exceeded with url" in message
        assert (folder / "config.json").read_text() == "{}"  # the written folder is kept
    else:
        assert push_model_dir(folder, "someone/textdiff") == "https://huggingface.co/someone/textdiff"
        assert _FakeHub.calls == [
            ("create_repo", "someone/textdiff", {"repo_type": "model", "exist_ok": True}),
            ("upload_folder", {"folder_path": str(folder), "repo_id": "someone/textdiff", "repo_type": "model",
                               "commit_message": "textdiff export"})]


def test_export_refuses_a_folder_that_is_not_a_model_folder(tiny: dict, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match="not a model folder"):
        export_run(tiny["run"], tmp_path, console=quiet())
    again = export_run(tiny["run"], tiny["root"] / "model-again", console=quiet())
    assert export_run(tiny["run"], again, console=quiet()) == again  # a model folder is rewritten
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (Path(again) / name).read_bytes() == (tiny["model"] / name).read_bytes()


@pytest.mark.parametrize("flat", [
    {},
    {"model": "plain-unet", "width": 8, "depth": 2, "epochs": 3, "lr_drop_epoch": None, "augment": False},
    {"fusion": "none", "blocks": (4,), "steps": (50, 250), "dim": 16, "head_channels": (8, 4), "norm": "batch",
     "shared_block": False, "pos_enc": True, "attend_padding": True, "seed": 3, "train_count": 2, "lr": 3e-4,
     "precision": "bf16", "memory_budget_gb": 1.5},
    {"dim": 16, "text_dropout": 0.25},
    {"dim": 16, "text_dropout": 0.5, "dropout_classifier": "own"},
])
def test_card_fit_command_parses_to_the_run_settings(flat: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The card's `pipeline fit` / `baseline` command, given to the CLI, makes the very FitConfig of the run."""
    cfg = FitConfig.flat(cache=tmp_path / "store.zarr", out=tmp_path / "run", **flat)
    command = fit_command(cfg.to_json(), str(cfg.cache), str(cfg.out))
    assert "Python API" not in command
    seen = []
    monkeypatch.setattr(pipeline, "_fit_and_report", seen.append)
    res = runner.invoke(pipeline.app, command.split()[1:])
    assert res.exit_code == 0, res.output
    assert seen[0].to_json() == cfg.to_json()
    odd = fit_command({**cfg.to_json(), "val_fraction": 0.3}, str(cfg.cache), str(cfg.out))
    assert odd.endswith("(and, through the Python API: val_fraction=0.3)")


def test_no_torch_load_without_weights_only_anywhere() -> None:
    """Nothing loads a pickle: every torch.load in the repository passes weights_only=True."""
    unsafe = []
    files = [p for p in REPO.rglob("*.py") if not {".venv", "runs", "node_modules"} & set(p.parts)]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert len(files) > 50 and not unsafe, unsafe


@pytest.mark.parametrize("flat", [{"fusion": "none", "dim": 16, "head_channels": (8, 4)},
                                  {"model": "plain-unet", "width": 4, "depth": 2}], ids=["no-text", "plain-unet"])
def test_every_model_kind_exports_and_predicts_as_its_run(tiny: dict, tmp_path: Path, flat: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.datasets import read_image

    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(tiny["ckpt"].parent))
    run = tmp_path / "run"
    fit(FitConfig.flat(cache=tiny["store"], out=run, epochs=1, **flat), console=quiet())
    folder = Path(export_run(run, tmp_path / "model", console=quiet()))
    card = (folder / "README.md").read_text()
    assert ("plain U-Net" in card) == (flat.get("model") == "plain-unet") and '--text "..."' not in card
    image = read_image(next(tiny["images"].iterdir()), 32)[0]
    from_run, from_dir = (Predictor.from_run(p, device="cpu") for p in (run, folder))
    assert from_dir.encoder is None and from_dir.fingerprint() == from_run.fingerprint()
    np.testing.assert_array_equal(from_dir.probabilities(image, ""), from_run.probabilities(image, ""))


def test_card_and_config_name_no_place_of_the_machine(tiny: dict) -> None:
    """The exported folder shares nothing of the machine it was made on: names and placeholders only."""
    card, config = ((tiny["model"] / name).read_text() for name in ("README.md", "config.json"))
    for text in (card, config):
        for local in (str(tiny["root"]), str(tiny["ckpt"].parent), "/tmp/", "/home/", "/work/", "--cache-dir"):
            assert local not in text, local
    assert "--unet <adm_tiny.pt> --unet-flags <adm_tiny_flags.json>" in card
    assert f"--cache <{Path(tiny['store']).name}> --out <run>" in card and "`<adm_tiny.pt>`, sha256" in card
    unet = json.loads(config)["unet"]
    assert "source" not in unet and unet["file"] == "adm_tiny.pt" and unet["preset"] is None


def test_shareable_command_writes_names_and_placeholders() -> None:
    command = ("pipeline extract --dataset monuseg --data-root /data/x/MoNuSeg --unet /home/me/256x256_diffusion_"
               "uncond.pt --text-encoder minilm --size 64 --steps 50,250 --blocks 4,8 --cache-dir /tmp/c")
    assert shareable_command(command) == ("pipeline extract --dataset monuseg --data-root <MoNuSeg> --unet "
                                          "<256x256_diffusion_uncond.pt> --text-encoder minilm --size 64 --steps "
                                          "50,250 --blocks 4,8")
    assert shareable_command("pipeline extract --unet adm-imagenet-256 --text-encoder a/b") == \
        "pipeline extract --unet adm-imagenet-256 --text-encoder a/b"  # a preset, a Hub id: names


def _copy_model(tiny: dict, to: Path) -> Path:
    shutil.copytree(tiny["model"], to)
    return to


def test_model_dir_finds_its_unet_by_name_or_says_where_it_looked(tiny: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(empty))
    model, image = _copy_model(tiny, tmp_path / "model"), next(tiny["images"].iterdir())
    with pytest.raises(UNetNotFoundError) as info:
        Predictor.from_run(model, device="cpu")
    message, sha = str(info.value), json.loads((model / "config.json").read_text())["unet"]["weights_sha256"]
    assert "\n" not in message and "adm_tiny.pt" in message and sha in message
    assert str(model) in message and str(empty) in message and "unet=PATH" in message
    line = error_line(["predict", str(model), "--image", str(image), "--text", "two lesions",
                       "--out", str(tmp_path / "m.png")])
    assert "adm_tiny.pt" in line and str(empty) in line and "--unet PATH" in line, line
    by_run = Predictor.from_run(tiny["run"], device="cpu")
    pixels = by_run.probabilities(np.zeros((3, 32, 32), np.uint8), "two lesions")
    given = Predictor.from_run(model, device="cpu", unet=str(tiny["ckpt"]))  # --unet
    np.testing.assert_array_equal(given.probabilities(np.zeros((3, 32, 32), np.uint8), "two lesions"), pixels)
    shutil.copyfile(tiny["ckpt"], model / "adm_tiny.pt")  # beside config.json
    beside = Predictor.from_run(model, device="cpu")
    assert beside.fingerprint() == by_run.fingerprint()


def test_model_dir_refuses_a_unet_of_its_name_with_other_bytes(tiny: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(tiny["ckpt"].parent))  # the right one, found second
    model = _copy_model(tiny, tmp_path / "model")
    original = tiny["ckpt"].read_bytes()
    (model / "adm_tiny.pt").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(WeightsMismatchError) as info:
        Predictor.from_run(model, device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(model / "adm_tiny.pt") in message and "config.json" in message


def test_an_older_model_dir_recording_the_unet_path_still_loads(tiny: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders exported before the UNet was recorded by name hold its absolute path in ``unet.source``: read
    from there while it exists, else found by that path's file name as a new folder's is."""
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(empty))
    model = _copy_model(tiny, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    unet = {k: v for k, v in config["unet"].items() if k not in ("file", "preset")}
    moved = tmp_path / "gone" / "adm_tiny.pt"
    expected = Predictor.from_run(tiny["run"], device="cpu").fingerprint()
    for source in (str(tiny["ckpt"].resolve()), str(moved)):
        (model / "config.json").write_text(json.dumps({**config, "unet": {"source": source, **unet}}))
        if source == str(moved):
            with pytest.raises(UNetNotFoundError, match=f"nor at {moved}"):
                Predictor.from_run(model, device="cpu")
            monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(tiny["ckpt"].parent))  # found there by its name
        loaded = Predictor.from_run(model, device="cpu")
        assert loaded.stage_one.unet_source == source and loaded.fingerprint() == expected


def test_a_preset_unet_is_named_and_looked_for_in_the_models_folder(tiny: dict, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A preset is recorded by name and file (no path); a model folder looks for its file beside config.json and
    in the models folder, and says where it is published when it is in neither. A text encoder read from a
    local folder is recorded by its ``source_name`` alone."""
    import dataclasses

    from extract.checkpoints import PRESETS
    from train.runs.modeldir import StageOne

    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(tmp_path / "models"))
    stage = dataclasses.replace(StageOne.of_store(FeatureStore.open(tiny["store"])), unet_source="adm-imagenet-256",
                                unet_file=PRESETS["adm-imagenet-256"].filename, text_encoder_source=str(tmp_path))
    config = stage.to_json()
    assert {k: v for k, v in config["unet"].items() if k in ("file", "preset")} == {
        "file": "256x256_diffusion_uncond.pt", "preset": "adm-imagenet-256"}
    assert config["text_encoder"]["source"] is None and str(tmp_path) not in json.dumps(config)
    read = StageOne.from_json(config, tmp_path / "model")
    with pytest.raises(UNetNotFoundError) as info:
        read.unet_spec()
    message = str(info.value)
    assert "\n" not in message and PRESETS["adm-imagenet-256"].url in message and str(tmp_path / "models") in message
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "256x256_diffusion_uncond.pt").write_bytes(b"")
    assert read.unet_spec() == str(tmp_path / "models" / "256x256_diffusion_uncond.pt")
