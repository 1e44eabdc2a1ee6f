"""textdiff command line: one command per stage (``extract``, then ``fit`` / ``evaluate``), plus ``cache``.

Errors the user can fix are printed as one line naming the file or argument; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from cli_support import (config_options, config_values, err, friendly, ints, option, run_app, shared_options,
                         state)

from extract.config import ExtractConfig, PretrainConfig
from train.config import (DemoConfig, EvaluateConfig, ExportConfig, FitConfig, PlainUNetArgs, PredictConfig,
                          TextDiffArgs)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TextDiff: segmentation from a frozen diffusion UNet + free text, via a feature cache.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and clean up feature stores.")
app.add_typer(cache_app, name="cache")



@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    state["debug"] = debug


@app.command()
@friendly
@shared_options(**config_options(
    ExtractConfig, skip=("dataset_options",),
    cache_dir=("cache_dir", (Optional[str], option(ExtractConfig, "cache_dir", default=None))),  # None: the config's
    color_order=("bgr", (bool, option(ExtractConfig, "color_order", "--bgr", default=False,
                                      help="Feed BGR like the authors' OpenCV loader (default RGB).")))))
def extract(common: Optional[dict] = None) -> None:
    """Stage one: run the frozen UNet and text encoder once, write features to the store.

    Re-running computes only what the store lacks; the last line printed is the store's path.
    """
    from extract.run import run_extract

    values, cache_dir = config_values(ExtractConfig, common or {}), (common or {}).get("cache_dir")
    values.pop("cache_dir", None)
    cfg = ExtractConfig(**values, color_order="bgr" if (common or {}).get("bgr") else "rgb",
                        **({"cache_dir": cache_dir} if cache_dir else {}))
    path = run_extract(cfg, console=err)
    typer.echo(str(path))


def _training_options() -> dict[str, tuple[Any, Any]]:
    """Options `fit`, `baseline` and `sweep` share: the few-shot subset, epochs, seed, augmentation, resume."""
    return {
        "train_count": (Optional[int], option(FitConfig, "train_count")),
        "subset_seed": (int, option(FitConfig, "subset_seed")),
        "epochs": (int, option(FitConfig, "epochs")),
        "seed": (Optional[int], option(FitConfig, "seed")),
        "no_augment": (bool, option(FitConfig, "augment", "--no-augment", default=False,
                                    help="Do not sample the cached dihedral views.")),
        "val_every": (int, option(FitConfig, "val_every")),
        "device": (Optional[str], option(FitConfig, "device")),
        "precision": (str, option(FitConfig, "precision")),
        "resume": (bool, option(FitConfig, "resume", "--resume")),
        "overwrite": (bool, option(FitConfig, "overwrite", "--overwrite")),
    }


def _optimiser_options() -> dict[str, tuple[Any, Any]]:
    """Options `fit` and `baseline` share: the optimiser's."""
    return {"batch_size": (int, option(FitConfig, "batch_size")), "lr": (float, option(FitConfig, "lr")),
            "lr_drop_epoch": (int, option(FitConfig, "lr_drop_epoch"))}


def _head_options() -> dict[str, tuple[Any, Any]]:
    """Options `fit` and `sweep` share: the TextDiff head's width, the features' memory budget and the text a
    cached view is trained with."""
    return {"dim": (int, option(TextDiffArgs, "dim")), "head_channels": (str, option(TextDiffArgs, "head_channels")),
            "memory_budget_gb": (float, option(FitConfig, "memory_budget_gb")),
            "view_text": (str, option(FitConfig, "view_text"))}


def _flat(common: dict[str, Any]) -> dict[str, Any]:
    """Shared options as FitConfig's flat keys (a negated flag, 0 = never, comma-separated integers)."""
    flat = dict(common)
    if "no_augment" in flat:
        flat["augment"] = not flat.pop("no_augment")
    if "lr_drop_epoch" in flat:
        flat["lr_drop_epoch"] = flat["lr_drop_epoch"] or None
    if "head_channels" in flat:
        flat["head_channels"] = ints(flat["head_channels"], "--head-channels") or ()
    return flat


@app.command()
@friendly
@shared_options(**_training_options(), **_optimiser_options(), **_head_options())
def fit(
    cache: str = option(FitConfig, "cache"),
    out: Path = option(FitConfig, "out"),
    blocks: Optional[str] = option(FitConfig, "blocks"),
    steps: Optional[str] = option(FitConfig, "steps"),
    norm: str = option(TextDiffArgs, "norm"),
    no_text: bool = typer.Option(False, "--no-text", help="Ablation ζ1: no cross-attention, text unused."),
    fusion: str = option(TextDiffArgs, "fusion"),
    pos_enc: bool = option(TextDiffArgs, "pos_enc", "--pos-enc"),
    per_scale_blocks: bool = option(TextDiffArgs, "shared_block", "--per-scale-blocks", default=False,
                                    help="One transformer block per scale instead of one shared."),
    dice_on_logits: bool = option(FitConfig, "dice_on_logits", "--dice-on-logits"),
    attend_padding: bool = option(FitConfig, "attend_padding", "--attend-padding"),
    text_dropout: float = option(FitConfig, "text_dropout"),
    dropout_classifier: str = option(FitConfig, "dropout_classifier"),
    common: Optional[dict] = None,
) -> None:
    """Stage two: train the cross-attention and pixel classifier from the cache."""
    if no_text and fusion != "cross-attn":
        raise typer.BadParameter("--no-text and --fusion are exclusive")
    cfg = FitConfig.flat(cache=cache, out=out, blocks=ints(blocks, "--blocks"), steps=ints(steps, "--steps"),
                         norm=norm, fusion="none" if no_text else fusion, pos_enc=pos_enc,
                         shared_block=not per_scale_blocks, dice_on_logits=dice_on_logits,
                         attend_padding=attend_padding, text_dropout=text_dropout,
                         dropout_classifier=dropout_classifier, **_flat(common or {}))
    _fit_and_report(cfg)


def _fit_and_report(cfg: FitConfig) -> None:
    """Run a fit (any model), say its best epoch, print its folder."""
    from train.fit import fit as run_fit

    metrics = run_fit(cfg, console=err)
    err.print(f"best validation Dice {metrics['best_val_dice']:.4f} at epoch {metrics['best_epoch']}")
    typer.echo(str(cfg.out))


@app.command()
@friendly
@shared_options(**_training_options(), **_optimiser_options())
def baseline(
    out: Path = option(FitConfig, "out", help="The run folder to write (`pipeline evaluate` scores it)."),
    cache: Optional[str] = option(FitConfig, "cache", default=None, help="A store of the dataset (from `pipeline extract`): its images, masks, splits and views are used; no features needed."),
    dataset: Optional[str] = typer.Option(None, help="Instead of --cache: use the newest complete store of this dataset in --cache-dir (one with d4 views first)."),
    data_root: Optional[Path] = typer.Option(None, help="With --dataset: only a store made from this folder."),
    size: Optional[int] = typer.Option(None, help="With --dataset: only a store of this image size."),
    cache_dir: Optional[str] = typer.Option(None, help="With --dataset: where to look (default: $TEXTDIFF_CACHE_DIR or ~/.cache/textdiff)."),
    width: int = option(PlainUNetArgs, "width"),
    depth: int = option(PlainUNetArgs, "depth"),
    common: Optional[dict] = None,
) -> None:
    """The plain U-Net baseline: trained on the same few labelled images as `fit` (same subset, views,
    loss, optimiser, best epoch on validation), on the images alone."""
    from cache.key import default_cache_dir
    from train.plain_unet import NoStoreError, baseline_store

    if (cache is None) == (dataset is None):
        raise typer.BadParameter("give either --cache STORE or --dataset NAME (to find its store in --cache-dir)")
    if dataset is not None:
        try:
            cache = str(baseline_store(cache_dir or default_cache_dir(), dataset, data_root, size))
        except NoStoreError as e:
            raise NoStoreError(f"{e}, or pass --cache STORE") from None
        err.print(f"baseline: images of {cache}", highlight=False, soft_wrap=True)
    _fit_and_report(FitConfig.flat(cache=cache, out=out, model="plain-unet", width=width, depth=depth,
                                   **_flat(common or {})))


@app.command()
@friendly
def evaluate(
    run: Path = typer.Argument(..., help="A `pipeline fit` run folder."),
    split: str = option(EvaluateConfig, "split"),
    cache: Optional[str] = option(EvaluateConfig, "cache"),
    overlays: bool = option(EvaluateConfig, "overlays", "--overlays/--no-overlays"),
    device: Optional[str] = option(EvaluateConfig, "device"),
    precision: str = option(EvaluateConfig, "precision"),
    text: str = option(EvaluateConfig, "text"),
    text_seed: int = option(EvaluateConfig, "text_seed"),
    text_encoder: Optional[str] = option(EvaluateConfig, "text_encoder"),
) -> None:
    """Score a run on one split: per_image.csv, summary.json, predictions.npz and overlays in RUN/eval-<split>/
    (RUN/eval-<split>-text-<mode>/ with --text none|shuffled|mirrored)."""
    from train.evaluate import evaluate_cli

    evaluate_cli(run, split=split, cache=cache, overlays=overlays, device=device, precision=precision, text=text,
                 text_seed=text_seed, text_encoder=text_encoder, console=err)


@app.command()
@friendly
@shared_options(**_training_options(), **_head_options())
def sweep(
    cache: str = option(FitConfig, "cache", help="A store written by `pipeline extract`; every block and step in it is swept."),
    out: Path = option(FitConfig, "out", help="The sweep folder (runs/<name>, sweep.csv, sweep.png); run again to resume."),
    grid: bool = typer.Option(False, "--grid", help="Also one fit per (block, step) pair: the block × step heat-map grid.png."),
    scheduler: Optional[str] = option(ExtractConfig, "scheduler", help="Run the fits on dask.distributed, one per task: local:N (N worker processes here) or tcp://HOST:PORT (a running cluster sharing the filesystem; one worker per GPU, e.g. dask-cuda's LocalCUDACluster)."),
    threads: Optional[int] = option(ExtractConfig, "threads", help="Torch threads per worker (default: this process's, so the fits equal a serial sweep's)."),
    common: Optional[dict] = None,
) -> None:
    """Fig. 3: one fit per single block and per single step, with and without text, each scored on test."""
    from train.sweep import sweep_cli

    base = _flat(common or {})
    epochs = base.pop("epochs")
    sweep_cli(cache, out, epochs, base, console=err, grid=grid, scheduler=scheduler, threads=threads)


@app.command()
@friendly
def predict(
    run: Path = typer.Argument(..., help="A `pipeline fit` run folder, or a model folder from `pipeline export`."),
    image: Optional[Path] = option(PredictConfig, "image", "--image"),
    images: Optional[Path] = option(PredictConfig, "images", "--images"),
    text: str = option(PredictConfig, "text", "--text"),
    texts: Optional[Path] = option(PredictConfig, "texts", "--texts"),
    out: Path = option(PredictConfig, "out", "--out"),
    cache: Optional[str] = option(PredictConfig, "cache"),
    original_size: bool = option(PredictConfig, "original_size", "--original-size"),
    probabilities: bool = option(PredictConfig, "probabilities", "--probabilities"),
    skip_bad: bool = option(PredictConfig, "skip_bad", "--skip-bad"),
    unet: Optional[str] = option(PredictConfig, "unet"),
    text_encoder: Optional[str] = option(PredictConfig, "text_encoder"),
    device: Optional[str] = option(PredictConfig, "device"),
    precision: str = option(PredictConfig, "precision"),
) -> None:
    """Segment new images: stage one for them with the run's own UNet and text encoder, then the head.

    --image FILE: one image; --images DIR|TABLE: many (masks, predictions.csv; a rerun skips what is done).
    The last line printed is the mask's path, or predictions.csv's.
    """
    from train.predict_batch import predict_cli

    cfg = PredictConfig(out=out, image=image, images=images, text=text, texts=texts, cache=cache,
                        original_size=original_size, probabilities=probabilities, skip_bad=skip_bad, unet=unet,
                        text_encoder=text_encoder, device=device, precision=precision)
    typer.echo(str(predict_cli(run, cfg, console=err)))  # friendly() names the flags of the keywords it names


@app.command()
@friendly
def export(
    run: Path = typer.Argument(..., help="A finished `pipeline fit` (or `baseline`) run folder."),
    out: Path = option(ExportConfig, "out", "--out"),
    cache: Optional[str] = option(ExportConfig, "cache"),
    push: Optional[str] = option(ExportConfig, "push"),
) -> None:
    """Write a model folder to share (config.json, model.safetensors, a model card README.md), the Hugging Face
    Hub's model-repository layout; `pipeline predict MODEL_DIR` uses it without the store. The last line printed
    is the folder (or the Hub URL with --push)."""
    from train.export import export_run

    typer.echo(export_run(run, out, cache=cache, push=push, console=err))


@app.command()
@friendly
@shared_options(**config_options(PretrainConfig, skip=("samples", "sample_steps", "checkpoint_every", "dataset_options"),
                                 flags={"resume": ("--resume",)}))
def pretrain(common: Optional[dict] = None) -> None:
    """Train this project's ADM UNet on a dataset's unlabelled images (DDPM ε-prediction); use it with
    `pipeline extract --unet OUT`. The last line printed is the folder."""
    from extract.pretrain import pretrain as run_pretrain

    cfg = PretrainConfig(**config_values(PretrainConfig, common or {}))
    typer.echo(str(run_pretrain(cfg, console=err)))


@app.command()
@friendly
def demo(
    out: Path = option(DemoConfig, "out"),
    iterations: int = option(DemoConfig, "iterations"),
    epochs: int = option(DemoConfig, "epochs"),
) -> None:
    """The main job on the embedded default, offline: synthetic data → pretrain a diffusion UNet →
    extract (MiniLM text) → fit with and without text → evaluate → runs/demo/report.md."""
    from rich.table import Table

    from train.demo import demo_runs, run_demo
    from train.report import results_table

    report = run_demo(out, iterations=iterations, epochs=epochs, console=err)
    table = Table("run", "test Dice %", "IoU %", "global Dice %", title="textdiff demo (synthetic, test split)")
    for r in results_table(demo_runs(out)):
        table.add_row(r["run"], f"{100 * r['dice']:.2f} ± {100 * r['dice_std']:.2f}", f"{100 * r['iou']:.2f}",
                      f"{100 * r['global_dice']:.2f}")
    Console().print(table)
    typer.echo(str(report))


def _pairs_summary(names: list[str]) -> str:
    """"t50_b6", ... as "t 50,150 × b 6,8" when they form a full grid, else the list."""
    pairs = {tuple(int(x) for x in n[1:].split("_b")) for n in names}
    steps, blocks = sorted({s for s, _ in pairs}), sorted({b for _, b in pairs})
    if len(pairs) == len(steps) * len(blocks):
        return f"t {','.join(map(str, steps))} × b {','.join(map(str, blocks))}"
    return " ".join(names)


@cache_app.command("ls")
@friendly
def cache_ls(cache_dir: Optional[str] = typer.Option(None, help="(default: $TEXTDIFF_CACHE_DIR or ~/.cache/textdiff)")) -> None:
    """List the stores in the cache folder."""
    from rich.table import Table

    from cache import default_cache_dir, list_stores

    folder = cache_dir or default_cache_dir()
    rows = list_stores(folder)
    if not rows:
        err.print(f"no stores in {folder}")
        return
    table = Table("store", "dataset", "pairs", "images done", "last written", title=f"stores in {folder}")
    for column in table.columns:
        column.overflow = "fold"
    for r in rows:
        if "error" in r:
            table.add_row(Path(r["path"]).name, "[red]unreadable[/]", "", "", str(r["error"])[:60])
            continue
        table.add_row(Path(r["path"]).name, str(r["dataset"]), _pairs_summary(r["pairs"]),
                      f"{r['images_done']} / {r['images_total']}",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["modified"])))
    Console().print(table)


@cache_app.command("info")
@friendly
def cache_info(path: str = typer.Argument(..., help="A store (.zarr folder, .h5 file, or zarr URL).")) -> None:
    """A store's key, arrays (shapes, dtypes) and images done per split, as JSON."""
    from cache import FeatureStore

    typer.echo(json.dumps(FeatureStore.open(path).info(), indent=1, default=str))


@cache_app.command("verify")
@friendly
def cache_verify(path: str = typer.Argument(..., help="A store (.zarr folder, .h5 file, or zarr URL)."),
                 repair: bool = typer.Option(False, "--repair", help="Mark the damaged rows not done, so that the store's `pipeline extract` (printed) rewrites exactly them.")) -> None:
    """Check every image recorded as done: data present, no NaN/Inf, checksums recorded at write time
    match. Exits 1 and lists the problems if any."""
    from cache import FeatureStore, repair_store, verify_store
    from cache.backends import basename
    from cache.maintenance import work_items
    from extract.command import extract_command
    from extract.shared import stage_progress

    progress = stage_progress(err, "verify", "rows")
    with progress:
        task = progress.add_task(basename(path), total=work_items(path))
        report = verify_store(path, progress=lambda: progress.advance(task, 1))
    for line in report.problems[:50]:
        err.print(f"[red]problem[/]: {escape(line)}", soft_wrap=True, highlight=False)
    if len(report.problems) > 50:
        err.print(f"... and {len(report.problems) - 50} more")
    note = f"; {report.unrecorded} written before checksums (not compared)" if report.unrecorded else ""
    summary = (f"{report.path}: {report.rows_checked} images, {report.arrays_checked} arrays checked, "
               f"{len(report.problems)} problem(s){note}")
    if not report.ok:
        err.print(f"[red]FAILED[/] {summary}")
        if repair:
            n = repair_store(report)
            err.print(f"repaired: {n} damaged row(s) marked not done; rewrite them with the store's own command:\n"
                      f"  {escape(extract_command(FeatureStore.open(path)))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)
    typer.echo(f"OK {summary}")


@cache_app.command("export")
@friendly
def cache_export(path: str = typer.Argument(..., help="A store (.zarr folder, .h5 file, or zarr URL)."),
                 format: str = typer.Option(..., "--format", help="zarr or h5: the format to write."),
                 out: Optional[str] = typer.Option(None, help="Where (a path, or a URL for zarr) (default: the same name with the format's suffix)."),
                 ) -> None:
    """Copy a store into the other format (same arrays, checksums and done flags); an interrupted export
    resumes when run again. Prints the new store's path."""
    from cache import FeatureStore, export_store, export_target
    from cache.backends import FORMATS, basename
    from extract.shared import stage_progress

    if format not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {format!r}")
    target = export_target(path, format, out)
    progress = stage_progress(err, "export", "rows")
    with progress:
        task = progress.add_task(f"{basename(path)} → {basename(target)}", total=FeatureStore.open(path).rows_done())
        result = export_store(path, format, out, progress=lambda: progress.advance(task, 1))
    typer.echo(str(result))


def _removal_lines(rows: list[tuple[Path, int]], dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for path, nbytes in rows:
        typer.echo(f"{verb} {path} ({nbytes / 1e6:.1f} MB)")
    typer.echo(f"{verb} {len(rows)} store(s), {sum(b for _, b in rows) / 1e6:.1f} MB")


@cache_app.command("rm")
@friendly
def cache_rm(paths: list[Path] = typer.Argument(..., help="Stores (.zarr folders, .h5 files) to delete."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed.")) -> None:
    """Delete feature stores (anything that is not one is refused, and nothing is deleted)."""
    from cache import remove_stores

    _removal_lines(remove_stores(paths, dry_run=dry_run), dry_run)


@cache_app.command("gc")
@friendly
def cache_gc(cache_dir: Optional[str] = typer.Option(None, help="(default: $TEXTDIFF_CACHE_DIR or ~/.cache/textdiff)"),
             older_than: Optional[float] = typer.Option(None, help="Remove stores last written more than DAYS ago."),
             keep: Optional[int] = typer.Option(None, help="Keep the N most recently written stores (with --older-than: remove only stores that are both older and not among them)."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed.")) -> None:
    """Remove old feature stores from the cache folder; folders that are not stores are never touched."""
    from cache import default_cache_dir, gc_candidates, remove_stores

    doomed = [p for p, _ in gc_candidates(cache_dir or default_cache_dir(), older_than, keep)]
    _removal_lines(remove_stores(doomed, dry_run=dry_run), dry_run)


def main() -> None:
    """The ``pipeline`` command (its bad options and arguments reported on one line, exit code 2)."""
    run_app(app)


if __name__ == "__main__":
    main()
