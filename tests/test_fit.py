"""Stage two from the cache: run folder, determinism, subsets, streaming, refusals, no UNet/BERT."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.schema import SplitLayout
from cache.store import FeatureStore
from train.data.readers import MissingFeaturesError, SplitFeatures, choose_subset
from train.fit import FitConfig, fit
from train.runs.loading import load_run
from train.runs.rundir import INCOMPLETE, CacheMismatchError, load_weights

from helpers import tiny_store

REPO = Path(__file__).resolve().parents[1]


def tiny_fit(store: Path, out: Path, **kw) -> FitConfig:
    return FitConfig.flat(cache=store, out=out, epochs=2, dim=16, head_channels=(8, 4), **kw)


def test_fit_writes_a_complete_run(store_path: Path, tmp_path: Path) -> None:
    cfg = tiny_fit(store_path, tmp_path / "run")
    metrics = fit(cfg)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "cache_key.json", "config.json", "history.csv", "loss.png", "metrics.json", "model.safetensors"]
    config = json.loads((run / "config.json").read_text())
    assert config["blocks"] == [4, 8] and config["steps"] == [50, 250]
    assert config["train_ids"] == FeatureStore.open(store_path).ids("train")  # synthetic: all images
    assert config["val"]["split"] == "val" and len(config["val"]["ids"]) == 2
    assert config["head"]["in_channels"] == [2 * 64, 2 * 32] and config["head"]["text_dim"] == 384
    assert json.loads((run / "cache_key.json").read_text()) == FeatureStore.open(store_path).key
    lines = (run / "history.csv").read_text().splitlines()
    header = "epoch,train_loss,val_dice,val_iou,seconds,train_seconds,val_seconds,data_wait_seconds"
    assert lines[0] == header and len(lines) == 3
    assert metrics == json.loads((run / "metrics.json").read_text())
    assert 1 <= metrics["best_epoch"] <= 2 and 0 <= metrics["best_val_dice"] <= 1
    _, head, _ = load_run(run)
    assert not head.training


def test_same_seed_gives_bit_identical_runs(store_path: Path, tmp_path: Path) -> None:
    a = fit(tiny_fit(store_path, tmp_path / "a"))
    b = fit(tiny_fit(store_path, tmp_path / "b"))
    fit(tiny_fit(store_path, tmp_path / "c", seed=1))
    wa, wb, wc = (load_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    strip = lambda m: {k: v for k, v in m.items() if not k.endswith("seconds")}  # noqa: E731
    assert strip(a) == strip(b)


def test_streaming_equals_in_memory(store_path: Path, tmp_path: Path) -> None:
    fit(tiny_fit(store_path, tmp_path / "mem"))
    fit(tiny_fit(store_path, tmp_path / "stream", memory_budget_gb=0.0))
    wm = load_weights(tmp_path / "mem")
    ws = load_weights(tmp_path / "stream")
    assert all(torch.equal(wm[k], ws[k]) for k in wm)
    store = FeatureStore.open(store_path)
    assert SplitFeatures(store, "train", [4], [50], memory_budget=0).in_memory is False
    assert SplitFeatures(store, "train", [4], [50]).in_memory is True


def test_few_shot_subset_is_recorded_and_seeded(store_path: Path, tmp_path: Path) -> None:
    fit(tiny_fit(store_path, tmp_path / "s", train_count=2, subset_seed=3))
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    ids = FeatureStore.open(store_path).ids("train")
    assert config["train_ids"] == [ids[i] for i in choose_subset(4, 2, 3)]
    assert len(set(config["train_ids"])) == 2
    assert list(choose_subset(10, 3, 0)) == list(choose_subset(10, 3, 0)) != list(choose_subset(10, 3, 1))


def test_blocks_or_steps_missing_from_the_store_are_refused(store_path: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingFeaturesError) as info:
        fit(tiny_fit(store_path, tmp_path / "x", blocks=(4, 6), steps=(50, 150)))
    msg = str(info.value)
    assert "pipeline extract" in msg and "--blocks 4,6" in msg and "--steps 50,150" in msg
    assert "--dataset synthetic" in msg and "adm_tiny.pt" in msg and "--text-encoder minilm" in msg
    assert not (tmp_path / "x").exists()


def test_single_block_and_step_selection(store_path: Path, tmp_path: Path) -> None:
    fit(tiny_fit(store_path, tmp_path / "one", blocks=(8,), steps=(250,), fusion="none"))
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["head"]["in_channels"] == [32] and config["head"]["fusion"] == "none"


def test_holdout_when_there_is_no_val_split(tiny_unet: Path, tmp_path: Path) -> None:
    store = tiny_store(tiny_unet, tmp_path / "c", counts={"train": 5, "test": 2})
    fit(tiny_fit(store, tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["val"]["split"] == "train" and len(config["val"]["ids"]) == 1
    assert not set(config["val"]["ids"]) & set(config["train_ids"]) and len(config["train_ids"]) == 4


def test_d4_store_trains_on_sampled_views(tiny_unet: Path, tmp_path: Path, monkeypatch) -> None:
    store = tiny_store(tiny_unet, tmp_path / "c", counts={"train": 3, "val": 1}, augment="d4")
    seen: list[int] = []
    real = SplitFeatures.batch

    def spy(self, rows, views=None, **kw):
        if self.split == "train":
            seen.extend(views or [0])
        return real(self, rows, views, **kw)

    monkeypatch.setattr(SplitFeatures, "batch", spy)
    fit(replace(tiny_fit(store, tmp_path / "run"), epochs=6))
    assert 0 in seen and len(set(seen)) >= 3 and max(seen) <= 7


@pytest.fixture(scope="module")
def d4_path(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A d4 synthetic store: its texts name regions, so most views have a text of their own."""
    return tiny_store(tiny_unet, tmp_path_factory.mktemp("d4"), counts={"train": 4, "val": 1}, augment="d4")


def _given_tokens(monkeypatch) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """Spy on the training batches: (image id, view, the tokens and token mask that sample was given)."""
    seen: list[tuple[str, int, np.ndarray, np.ndarray]] = []
    real = SplitFeatures.batch

    def spy(self, rows, views=None, **kw):
        sample = real(self, rows, views, **kw)
        if self.split == "train":
            for n, (k, v) in enumerate(zip(rows, views or [0] * len(rows))):
                seen.append((self.ids[k], v, sample.tokens[n].numpy(), sample.token_mask[n].numpy()))
        return sample

    monkeypatch.setattr(SplitFeatures, "batch", spy)
    return seen


@pytest.mark.parametrize("view_text", ["same", "rewrite", "unchanged"])
def test_view_text_policies_give_each_view_its_tokens(d4_path: Path, tmp_path: Path, monkeypatch,
                                                      view_text: str) -> None:
    seen = _given_tokens(monkeypatch)
    fit(replace(tiny_fit(d4_path, tmp_path / "run", view_text=view_text), epochs=10))
    store = FeatureStore.open(d4_path)
    ids, texts, view_texts = store.ids("train"), store.texts("train"), store.view_texts("train")
    tokens, mask = store.tokens("train").compute(), store.token_mask("train")
    view_tokens, view_mask = store.view_tokens("train").compute(), store.view_token_mask("train")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["fit"]["view_text"] == view_text
    assert sum(t != texts[i] for i in range(4) for t in view_texts[i]) >= 8  # most views say something else
    own_text = 0
    for image_id, v, got, got_mask in seen:
        i = ids.index(image_id)
        if view_text == "rewrite":  # the view's own text's tokens
            np.testing.assert_array_equal(got, view_tokens[i, v].astype(np.float32))
            np.testing.assert_array_equal(got_mask, view_mask[i, v])
            own_text += view_texts[i][v] != texts[i]
        else:  # the image's text's tokens
            np.testing.assert_array_equal(got, tokens[i].astype(np.float32))
            np.testing.assert_array_equal(got_mask, mask[i])
        if view_text == "unchanged":
            assert view_texts[i][v] == texts[i], (image_id, v)
    views_seen = {v for _, v, _, _ in seen}
    if view_text == "rewrite":
        assert own_text > 0 and len(views_seen) >= 4
    if view_text == "same":
        assert len(views_seen) >= 4 and any(view_texts[ids.index(i)][v] != texts[ids.index(i)] for i, v, _, _ in seen)


def test_view_text_needs_views_with_their_own_text(store_path: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import pipeline
    from common.errors import OptionError

    with pytest.raises(OptionError, match=r"^view_text='rewrite' needs a store whose training views keep their own "
                                          r"text \(`pipeline extract \.\.\. --augment d4`\); .* has one view"):
        fit(tiny_fit(store_path, tmp_path / "run", view_text="rewrite"))
    assert not (tmp_path / "run").exists()
    res = CliRunner().invoke(pipeline.app, ["fit", "--cache", str(store_path), "--out", str(tmp_path / "cli"),
                                            "--view-text", "unchanged"])
    assert res.exit_code == 1 and "error: --view-text unchanged needs a store" in res.output, res.output
    with pytest.raises(OptionError, match=r"view_text must be one of \['same', 'rewrite', 'unchanged'\]"):
        tiny_fit(store_path, tmp_path / "x", view_text="flipped")


def test_a_d4_store_without_view_texts_trains_with_the_same_text(tmp_path: Path) -> None:
    """A store made before views kept their own text: every view reads the image's tokens; rewrite is refused."""
    from common.errors import OptionError
    from train.fit import check_view_text, view_choices

    old = FeatureStore.create(tmp_path / "old.zarr", {"k": 1}, size=8, token_len=3, token_dim=2,
                              splits={"train": SplitLayout(["a"], ["upper"], 8)})
    assert old.view_texts("train") is None
    with pytest.raises(OptionError, match="views made before they kept their own text"):
        check_view_text(old, "unchanged")

    class Rows:  # what view_choices reads of a split
        texts, view_texts = ["upper"], None

    assert view_choices(Rows(), "unchanged") is None
    Rows.view_texts = [["upper", "left", "upper", "lower", "upper", "right", "lower", "left"]]
    assert view_choices(Rows(), "unchanged") == [[0, 2, 4]] and view_choices(Rows(), "rewrite") is None


def test_a_different_store_is_refused(store_path: Path, tiny_unet: Path, tmp_path: Path) -> None:
    fit(tiny_fit(store_path, tmp_path / "run"))
    other = tiny_store(tiny_unet, tmp_path / "other", seed=41)
    with pytest.raises(CacheMismatchError, match="not the one run"):
        load_run(tmp_path / "run", cache=other)


def test_interrupted_fit_is_marked_incomplete(store_path: Path, tmp_path: Path, monkeypatch) -> None:
    import train.fit as fit_module

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "validate", boom)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_fit(store_path, tmp_path / "run"))
    assert (tmp_path / "run" / INCOMPLETE).exists()
    with pytest.raises(ValueError, match="incomplete"):
        load_run(tmp_path / "run")


def test_fit_never_loads_the_unet_or_a_text_encoder(store_path: Path, tmp_path: Path) -> None:
    code = f"""
import sys
from pathlib import Path
from train.fit import FitConfig, fit
fit(FitConfig.flat(cache=Path({str(store_path)!r}), out=Path({str(tmp_path / 'r')!r}), epochs=1, dim=16,
              head_channels=(8, 4)))
loaded = [m for m in ("extract.unet", "extract.features", "extract.text", "transformers") if m in sys.modules]
assert not loaded, loaded
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_fit_cli(store_path: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import pipeline

    res = CliRunner().invoke(pipeline.app, ["fit", "--cache", str(store_path), "--out", str(tmp_path / "r"),
                                            "--epochs", "1", "--dim", "16", "--head-channels", "8,4", "--no-text"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["head"]["fusion"] == "none"
    bad = CliRunner().invoke(pipeline.app, ["fit", "--cache", str(store_path), "--out", str(tmp_path / "q"),
                                            "--blocks", "6"])
    assert bad.exit_code == 1 and "pipeline extract" in bad.output and "Traceback" not in bad.output
    assert np.isfinite(json.loads((tmp_path / "r" / "metrics.json").read_text())["final_train_loss"])


def test_precision_is_recorded_and_bf16_trains_close_to_fp32(store_path: Path, tmp_path: Path) -> None:
    """``precision="bf16"`` autocasts training and validation (recorded in config.json, with the device
    used); it learns what fp32 learns, to bf16's precision. A device the machine lacks is refused before
    anything is written."""
    from common.errors import OptionError

    base = dict(cache=store_path, epochs=3, dim=16, head_channels=(8, 4), lr=1e-3)
    a = fit(FitConfig.flat(out=tmp_path / "fp32", **base))
    b = fit(FitConfig.flat(out=tmp_path / "bf16", precision="bf16", **base))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["fit"]["precision"] == "bf16" and config["device"] == "cpu"
    assert a["final_train_loss"] != b["final_train_loss"]  # autocast ran
    assert abs(a["final_train_loss"] - b["final_train_loss"]) < 0.05 * a["final_train_loss"]
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="no CUDA device is available here"):
            fit(FitConfig.flat(out=tmp_path / "cuda", device="cuda", **base))
        assert not (tmp_path / "cuda").exists()


def test_the_feed_gives_the_loop_what_batch_gives(store_path: Path) -> None:
    from train.data.feed import Feed

    data = SplitFeatures(FeatureStore.open(store_path), "train", [4, 8], [50, 250], memory_budget=0)  # streamed
    batches = [([2, 0], [0, 0]), ([1], [0]), ([3, 1], [0, 0])]
    feed = Feed(data, batches, torch.device("cpu"))
    got = list(feed)
    assert len(got) == 3 and feed.waited >= 0
    for (sample, target), (rows, views) in zip(got, batches):
        want = data.batch(rows, views)
        assert all(torch.equal(a, b) for a, b in zip(sample.feats, want.feats))
        assert torch.equal(sample.tokens, want.tokens) and torch.equal(target, want.target)


def test_val_every_and_batches_of_two(store_path: Path, tmp_path: Path) -> None:
    import csv

    metrics = fit(FitConfig.flat(cache=store_path, out=tmp_path / "run", epochs=5, val_every=2, batch_size=2,
                                 dim=16, head_channels=(8, 4), lr=1e-3))
    with (tmp_path / "run" / "history.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    validated = [int(r["epoch"]) for r in rows if r["val_dice"] != ""]
    assert validated == [2, 4, 5] and metrics["best_epoch"] in validated  # every 2nd epoch, and the last
    assert all(float(r["val_seconds"]) == 0 or int(r["epoch"]) in validated for r in rows)
    assert all(float(r["train_seconds"]) > 0 and float(r["data_wait_seconds"]) >= 0 for r in rows)
    with pytest.raises(ValueError, match="val_every must be >= 1"):
        FitConfig.flat(cache=store_path, out=tmp_path / "x", val_every=0)


def test_a_fit_records_its_masks_and_is_scored_on_them(store_path: Path, tmp_path: Path) -> None:
    """One store, both resizings: a fit trains on the masks it names (recorded in config.json, read back by
    evaluate), so the authors' fit is scored against the authors' (larger) target areas."""
    import csv
    from train.evaluate import evaluate

    store = FeatureStore.open(store_path)
    assert (store.masks("test", "authors").sum() > store.masks("test").sum()).compute()  # dilated
    areas = {}
    for mode in ("nearest", "authors"):
        fit(tiny_fit(store_path, tmp_path / mode, mask_resize=mode))
        assert json.loads((tmp_path / mode / "config.json").read_text())["fit"]["mask_resize"] == mode
        evaluate(tmp_path / mode, overlays=False)
        with (tmp_path / mode / "eval-test" / "per_image.csv").open() as f:
            areas[mode] = [int(r["target_area"]) for r in csv.DictReader(f)]
        want = store.masks("test", mode)[:, 0].sum(axis=(1, 2)).compute().tolist()
        assert areas[mode] == want
    assert sum(areas["authors"]) > sum(areas["nearest"])
    with pytest.raises(ValueError, match=r"mask_resize must be one of \['nearest', 'authors'\], got 'area'"):
        tiny_fit(store_path, tmp_path / "x", mask_resize="area")


def test_a_gated_fit_records_its_gate_and_trains_it_open(store_path: Path, tmp_path: Path) -> None:
    fit(tiny_fit(store_path, tmp_path / "gated", text_gate=True))
    config = json.loads((tmp_path / "gated" / "config.json").read_text())
    assert config["fit"]["text_gate"] is True and config["head"]["text_gate"] is True
    _, head, _ = load_run(tmp_path / "gated")
    gate = head.blocks[0].gate.detach()
    assert gate.shape == (3,) and bool((gate[:2] != 0).all())  # the text branches' gates moved off closed
