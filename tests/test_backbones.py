"""Other diffusion backbones (issue 27): tiny random diffusers and MONAI UNets built here (no download). Hooked
features equal a manual forward of the same model on the same noised input; a store made from each fits, predicts
and exports; ``--list-blocks`` agrees with the stored shapes; a wrong folder is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("monai")
pytest.importorskip("einops")

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from monai.networks.nets import DiffusionModelUNet  # noqa: E402
from monai.networks.schedulers import DDPMScheduler as MonaiDDPM  # noqa: E402
from transformers import BertConfig, BertModel, BertTokenizer  # noqa: E402

from cache.store import FeatureStore  # noqa: E402
from common.errors import OptionError  # noqa: E402
from extract.backbones import block_table  # noqa: E402
from extract.checkpoints import resolve_unet  # noqa: E402
from extract.config import ExtractConfig  # noqa: E402
from extract.diffusion import shared_noise  # noqa: E402
from extract.features import FeatureExtractor  # noqa: E402
from extract.run import run_extract  # noqa: E402
from helpers import error_line, quiet  # noqa: E402

SIZE = 32
MONAI_ARGS = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "channels": [8, 16],
              "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 4, "norm_num_groups": 4}


def _pixel_unet(folder: Path) -> Path:
    """A diffusers UNet2DModel folder (config.json, safetensors) with its scheduler_config.json beside it."""
    torch.manual_seed(0)
    UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4, attention_head_dim=4).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_config(folder)
    return folder


def _latent_pipeline(folder: Path) -> Path:
    """A Stable-Diffusion-style pipeline folder: a conditional UNet on a VAE's 4-channel latents (1/2 size), a
    tiny BERT as its text encoder."""
    torch.manual_seed(1)
    UNet2DConditionModel(sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         norm_num_groups=4, attention_head_dim=4).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, layers_per_block=1, sample_size=SIZE).save_pretrained(folder / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cell", "nuclei", "large", "small", "many", "few"]
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "tokenizer" / "vocab.txt"), model_max_length=8).save_pretrained(folder / "tokenizer")
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def _monai_unet(folder: Path) -> tuple[Path, Path]:
    """A MONAI DiffusionModelUNet state dict and the JSON of its constructor (and scheduler) arguments."""
    torch.manual_seed(2)
    folder.mkdir(parents=True)
    torch.save(DiffusionModelUNet(**MONAI_ARGS).state_dict(), folder / "monai.pt")
    flags = folder / "monai.json"
    flags.write_text(json.dumps({"_class_name": "DiffusionModelUNet", **MONAI_ARGS,
                                 "scheduler": {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta"}}))
    return folder / "monai.pt", flags


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path | None]]:
    """kind → (--unet, --unet-flags) for each tiny backbone."""
    root = tmp_path_factory.mktemp("backbones")
    ckpt, flags = _monai_unet(root / "monai")
    return {"diffusers": (str(_pixel_unet(root / "ddpm")), None),
            "latent": (str(_latent_pipeline(root / "sd")), None),
            "monai": (str(ckpt), flags)}


def _x0(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _manual(module: torch.nn.Module, call, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` in one full forward ``call(zt, t)``."""
    got: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, _i, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            call(zt, t)
    finally:
        hook.remove()
    return got[0]


def test_pixel_unet_features_are_a_manual_forward_with_the_same_noise(models: dict) -> None:
    folder = Path(models["diffusers"][0])
    src = resolve_unet(str(folder))
    ex = FeatureExtractor.for_model(src.load(), SIZE, 40, device="cpu")
    x0, t = _x0(), torch.tensor([50, 250])
    got = ex.samples(x0, t, [1, 3])
    unet = UNet2DModel.from_pretrained(folder).eval()
    sched = DDPMScheduler.from_pretrained(folder)
    noise = shared_noise(SIZE, 40)
    zt = sched.add_noise(x0, noise.expand_as(x0), t)
    call = lambda z, s: unet(z, s)  # noqa: E731
    assert torch.equal(got[1], _manual(unet.up_blocks[0].upsamplers[0], call, zt, t))  # unit 1: up-block 0's upsampler
    assert torch.equal(got[3], _manual(unet.up_blocks[1].resnets[1], call, zt, t))
    names = [name for _, name, _ in block_table(src.shell(), SIZE)]
    assert names == ["up_blocks.0.attentions.0", "up_blocks.0.upsampler", "up_blocks.1.resnets.0",
                     "up_blocks.1.resnets.1"]
    assert [tuple(got[k].shape[1:]) for k in (1, 3)] == [src.block_shapes(SIZE)[k] for k in (1, 3)]


def test_latent_pipeline_encodes_with_its_vae_and_conditions_on_the_empty_prompt_or_the_text(models: dict) -> None:
    folder = Path(models["latent"][0])
    src = resolve_unet(str(folder))
    ex = FeatureExtractor.for_model(src.load(), SIZE, 40, device="cpu")
    assert ex.noise.shape == (1, 4, SIZE // 2, SIZE // 2)
    x0, t = _x0(), torch.tensor([50, 150])
    got = ex.samples(x0, t, [2])
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    tok = BertTokenizer.from_pretrained(folder / "tokenizer")
    enc = BertModel.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        z0 = vae.encode(x0).latent_dist.mean * vae.config.scaling_factor
        ids = tok([""], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
        context = enc(ids)[0].expand(2, -1, -1)
    zt = DDPMScheduler.from_pretrained(folder / "scheduler").add_noise(z0, ex.noise.expand_as(z0), t)
    call = lambda z, s: unet(z, s, encoder_hidden_states=context)  # noqa: E731
    assert torch.equal(got[2], _manual(unet.up_blocks[1].attentions[0], call, zt, t))
    # conditioned on each image's own text: other texts, other features; the key says which
    text_src = resolve_unet(str(folder), condition="text")
    ex_text = FeatureExtractor.for_model(text_src.load(), SIZE, 40, device="cpu")
    a = ex_text.samples(x0, t, [2], texts=["many large nuclei", "few small cell"])[2]
    b = ex_text.samples(x0, t, [2], texts=["many large nuclei", "many large nuclei"])[2]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert src.identity()["condition"] == "empty" and text_src.identity()["condition"] == "text"
    with pytest.raises(ValueError, match="pass 2 texts"):
        ex_text.samples(x0, t, [2])


def test_monai_unet_features_are_a_manual_forward(models: dict) -> None:
    ckpt, flags = models["monai"]
    src = resolve_unet(ckpt, flags)
    ex = FeatureExtractor.for_model(src.load(), SIZE, 40, device="cpu")
    x0, t = _x0(), torch.tensor([50, 250])
    got = ex.samples(x0, t, [0, 2])
    net = DiffusionModelUNet(**MONAI_ARGS)
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    net.eval()
    sched = MonaiDDPM(num_train_timesteps=1000, schedule="scaled_linear_beta")
    zt = sched.add_noise(x0, shared_noise(SIZE, 40).expand_as(x0), t)
    call = lambda z, s: net(z, s)  # noqa: E731
    assert torch.equal(got[0], _manual(net.up_blocks[0].attentions[0], call, zt, t))
    assert torch.equal(got[2], _manual(net.up_blocks[1].resnets[0], call, zt, t))


def test_keys_differ_between_backbones_and_conditions(models: dict) -> None:
    hashes = {json.dumps(resolve_unet(spec, flags).identity(), sort_keys=True) for spec, flags in models.values()}
    hashes.add(json.dumps(resolve_unet(models["latent"][0], condition="text").identity(), sort_keys=True))
    assert len(hashes) == 4
    kinds = {resolve_unet(spec, flags).identity()["kind"] for spec, flags in models.values()}
    assert kinds == {"diffusers", "monai"}


@pytest.mark.parametrize("kind", ["diffusers", "latent", "monai"])
def test_store_from_each_backbone_fits_predicts_and_exports(kind: str, models: dict, tmp_path: Path) -> None:
    from train.export import export_run
    from train.fit import FitConfig, fit
    from train.inference.predictor import Predictor
    from train.data.readers import SplitFeatures

    spec, flags = models[kind]
    condition = "text" if kind == "latent" else "empty"
    cfg = ExtractConfig(dataset="synthetic", unet=spec, unet_flags=flags, unet_condition=condition,
                        text_encoder="minilm", size=SIZE, steps=(50, 250), blocks=(1, 2), cache_dir=tmp_path / "c",
                        batch_size=4, dataset_options={"counts": {"train": 2, "val": 1, "test": 2}})
    path = run_extract(cfg, console=quiet())
    store = FeatureStore.open(path)
    shapes = block_table(resolve_unet(spec, flags, condition).shell(), SIZE)
    for b in (1, 2):
        assert tuple(store.features("test", 50, b).shape[2:]) == shapes[b][2]
    run = tmp_path / "run"
    fit(FitConfig.flat(cache=path, out=run, epochs=1, dim=8, head_channels=(4, 4), train_count=None))
    predictor = Predictor.from_run(run, device="cpu")
    data = SplitFeatures(store, "test", [1, 2], [50, 250])
    img = np.asarray(store.images("test")[0, 0].compute())
    for got, want in zip(predictor.features(img[None], [data.texts[0]]), data.batch([0]).feats):
        assert torch.equal(got, want)  # the store's features, recomputed for a new image
    folder = Path(export_run(run, tmp_path / "model"))
    if kind != "monai":  # a diffusers folder of the recorded name beside config.json is found there
        shutil.copytree(spec, folder / Path(spec).name)
    from_folder = Predictor.from_run(folder, device="cpu", unet=spec if kind == "monai" else None)
    np.testing.assert_array_equal(from_folder.probabilities(img, data.texts[0]),
                                  predictor.probabilities(img, data.texts[0]))


def test_wrong_folders_are_one_line(models: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(OptionError, match="no scheduler config"):
        resolve_unet(str(bad))
    (bad / "model_index.json").write_text("{}")
    with pytest.raises(OptionError, match="without unet/config.json"):
        resolve_unet(str(bad))
    with pytest.raises(OptionError, match="could not be fetched from the Hugging Face Hub"):
        resolve_unet("nobody-here/no-such-model")
    ckpt, flags = models["monai"]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"_class_name": "DiffusionModelUNet", **MONAI_ARGS, "channels": [8, 32]}))
    with pytest.raises(OptionError, match="does not fit DiffusionModelUNet"):
        resolve_unet(ckpt, wrong).load()
    line = error_line(["extract", "--dataset", "synthetic", "--unet", str(bad), "--list-blocks"])
    assert "without unet/config.json" in line and "\n" not in line


def test_list_blocks_prints_each_unit(models: dict) -> None:
    from typer.testing import CliRunner
    from pipeline import app

    out = CliRunner().invoke(app, ["extract", "--dataset", "synthetic", "--unet", models["diffusers"][0],
                                   "--size", str(SIZE), "--list-blocks"])
    assert out.exit_code == 0, out.output
    rows = [line.split() for line in out.output.splitlines() if line.strip()[:1].isdigit()]
    assert [r[1] for r in rows] == ["up_blocks.0.attentions.0", "up_blocks.0.upsampler", "up_blocks.1.resnets.0",
                                    "up_blocks.1.resnets.1"]
    assert rows[1][2:] == ["16", "32x32"] and rows[0][2:] == ["16", "16x16"]


def test_a_missing_extra_is_one_line_naming_what_to_install(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(OptionError, match=r"needs the diffusers package: pip install 'textdiff\[diffusers\]'"):
        resolve_unet(models["diffusers"][0]).load()
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    ckpt, flags = models["monai"]
    with pytest.raises(OptionError, match=r"pip install 'textdiff\[monai\]'"):
        resolve_unet(ckpt, flags).load()
