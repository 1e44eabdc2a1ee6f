"""The ADM UNet is guided-diffusion's function: fixtures, key manifest, options, loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.checkpoints import PRESETS, UNetNotFoundError, resolve_unet
from extract.unet import CheckpointMismatchError, create_unet, load_unet, normalize_flags


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours.detach().numpy() - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def tiny_io(adm_fixtures: Path) -> dict[str, np.ndarray]:
    return dict(np.load(adm_fixtures / "adm_tiny_io.npz"))


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_reproduces_guided_diffusion_fixture(adm_fixtures: Path, tiny_io: dict, impl: str) -> None:
    model = load_unet(adm_fixtures / "adm_tiny.pt", adm_fixtures / "adm_tiny_flags.json", attention_impl=impl)
    n_blocks = len(model.output_blocks)
    assert n_blocks == 12
    checked = 0
    for t in tiny_io["timesteps"].tolist():
        captured: dict[int, torch.Tensor] = {}
        hooks = [blk.register_forward_hook(lambda _m, _i, o, k=k: captured.__setitem__(k, o))
                 for k, blk in enumerate(model.output_blocks)]
        with torch.no_grad():
            out = model(torch.from_numpy(tiny_io[f"xt_t{t}"]), torch.tensor([t, t]))
        for h in hooks:
            h.remove()
        assert rel_err(out, tiny_io[f"out_t{t}"]) < 1e-5
        for k in range(n_blocks):
            assert rel_err(captured[k], tiny_io[f"block{k}_t{t}"]) < 1e-5, (t, k)
            checked += 1
    assert checked == 36


def test_builds_the_official_256_keys_and_shapes(adm_fixtures: Path) -> None:
    manifest = json.loads((adm_fixtures / "adm256_uncond_manifest.json").read_text())
    with torch.device("meta"):
        model = create_unet(**manifest["flags"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["state_dict"]
    assert len(shapes) == 566
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"] == 552_814_086
    assert len(model.output_blocks) == manifest["num_output_blocks"]
    # the preset is exactly those flags
    assert PRESETS["adm-imagenet-256"].flags == normalize_flags(manifest["flags"])


def test_the_built_tiny_unet_has_the_fixture_flags_and_keys(tiny_unet: Path, adm_fixtures: Path) -> None:
    """The suite's own tiny UNet (tests/conftest.py) is the fixture's model with other seeded weights."""
    assert json.loads((tiny_unet / "adm_tiny_flags.json").read_text()) == \
        json.loads((adm_fixtures / "adm_tiny_flags.json").read_text())
    ours = torch.load(tiny_unet / "adm_tiny.pt", weights_only=True)
    ref = torch.load(adm_fixtures / "adm_tiny.pt", weights_only=True)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_the_built_tiny_unet_is_seeded_with_no_zero_layer(tiny_unet: Path, tmp_path: Path) -> None:
    from tests.conftest import build_tiny_unet

    ours = torch.load(tiny_unet / "adm_tiny.pt", weights_only=True)
    again = torch.load(build_tiny_unet(tmp_path) / "adm_tiny.pt", weights_only=True)
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    assert [k for k, v in ours.items() if not v.any()] == []  # guided-diffusion's zero-initialised layers too
    load_unet(tiny_unet / "adm_tiny.pt", tiny_unet / "adm_tiny_flags.json")


def test_output_block_shapes_match_design_table() -> None:
    with torch.device("meta"):
        model = create_unet(**PRESETS["adm-imagenet-256"].flags)
    shapes = model.output_block_shapes(256)
    assert shapes[6] == (512, 32, 32) and shapes[8] == (512, 64, 64)
    assert shapes[12] == (256, 128, 128) and shapes[16] == (256, 256, 256)
    assert shapes[4] == (1024, 16, 16)


TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16,8")
OPTIONS = {
    "legacy-heads": dict(num_heads=2),
    "new-order": dict(use_new_attention_order=True, num_head_channels=16),
    "no-scale-shift": dict(use_scale_shift_norm=False, num_head_channels=8),
    "resblock-updown": dict(resblock_updown=True, num_heads=4, num_heads_upsample=2),
    "learn-sigma": dict(learn_sigma=True),
    "class-cond": dict(class_cond=True),
    "three-levels-float-mult": dict(channel_mult=(1, 1.5, 2), num_channels=64, image_size=64),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_builds_runs_and_round_trips(tmp_path: Path, name: str) -> None:
    flags = {**TINY, **OPTIONS[name]}
    torch.manual_seed(0)
    model = create_unet(attention_impl="reference", **flags).eval()
    for p in model.parameters():  # no zero-initialised layers, so every path matters
        torch.nn.init.normal_(p, std=0.05)
    size = flags["image_size"]
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([50, 250])
    y = torch.tensor([3, 999]) if flags.get("class_cond") else None
    with torch.no_grad():
        ref = model(x, t, y)
    assert ref.shape == (2, 6 if flags.get("learn_sigma") else 3, size, size)
    assert torch.isfinite(ref).all()
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    loaded = load_unet(ckpt, flags, attention_impl="sdpa")
    with torch.no_grad():
        out = loaded(x, t, y)
    assert rel_err(out, ref.numpy()) < 1e-5
    if flags.get("class_cond"):
        with torch.no_grad():
            other = loaded(x, t, torch.tensor([4, 0]))
        assert not torch.allclose(other, out), "the class label must change the output"


def test_class_label_required_iff_class_conditional() -> None:
    model = create_unet(**TINY)
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.tensor([0]))


def test_missing_flags_take_guided_diffusion_defaults() -> None:
    f = normalize_flags(image_size=64)
    assert f["num_channels"] == 128 and f["attention_resolutions"] == "16,8" and f["num_heads"] == 4
    assert f["use_scale_shift_norm"] is True and f["learn_sigma"] is False
    with pytest.raises(ValueError, match="unknown UNet flag"):
        normalize_flags(num_chanels=64)


def test_mismatched_checkpoint_lists_keys_and_flags(tmp_path: Path, tiny_unet: Path) -> None:
    sd = torch.load(tiny_unet / "adm_tiny.pt", weights_only=True)
    sd["extra.weight"] = torch.zeros(1)
    del sd["out.2.bias"]
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    flags = json.loads((tiny_unet / "adm_tiny_flags.json").read_text())
    flags["num_channels"] = 64
    with pytest.raises(CheckpointMismatchError) as info:
        load_unet(path, flags)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg and "missing keys (1)" in msg and "out.2.bias" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "mis-shaped keys" in msg and "time_embed.0.weight: checkpoint (128, 32) vs model (256, 64)" in msg
    assert '"num_channels": 64' in msg


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_loads_a_state_dict_in_either_torch_format(tmp_path: Path, zip_format: bool) -> None:
    """torch's zip files are memory-mapped; its legacy format (which cannot be) is read whole."""
    torch.manual_seed(0)
    model = create_unet(**TINY).eval()
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt, _use_new_zipfile_serialization=zip_format)
    loaded = load_unet(ckpt, TINY)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_unreadable_checkpoint_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt could not be read"):
        load_unet(bad, TINY)


def test_missing_preset_says_where_it_is_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(tmp_path))
    with pytest.raises(UNetNotFoundError) as info:
        resolve_unet("adm-imagenet-256")
    msg = str(info.value)
    assert "256x256_diffusion_uncond.pt" in msg and "openaipublic" in msg
    assert str(tmp_path) in msg and "unet=" in msg and "pipeline pretrain" in msg


def test_preset_found_in_models_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(tmp_path))
    (tmp_path / "256x256_diffusion_uncond.pt").write_bytes(b"x")
    src = resolve_unet("adm-imagenet-256")
    assert src.checkpoint == tmp_path / "256x256_diffusion_uncond.pt"
    assert src.flags["num_channels"] == 256


def test_pretrain_folder_and_flags_beside_file(tmp_path: Path, tiny_unet: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes((tiny_unet / "adm_tiny.pt").read_bytes())
    (run / "flags.json").write_text((tiny_unet / "adm_tiny_flags.json").read_text())
    a, b = resolve_unet(str(run)), resolve_unet(str(run / "model.pt"))
    assert a.checkpoint == b.checkpoint and a.flags == b.flags and a.flags["num_channels"] == 32
    with pytest.raises(UNetNotFoundError, match="unet_flags=FLAGS.json"):
        resolve_unet(str(tiny_unet / "adm_tiny.pt"))
