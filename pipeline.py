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

from cli_support import (config_options, config_values, err, field_option, flag, friendly, key_values, option,
                         run_app, shared_options, state)

from extract.config import ExtractConfig, PretrainConfig
from train.config import (COMMAND_OPTIONS, MODEL_ARGS, SWITCHES, DemoConfig, EvaluateConfig, ExportConfig, FitConfig,
                          PredictConfig, flat_from_options, option_home)

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
                                      help="Feed BGR like the authors' OpenCV loader (default RGB).")))),
    list_blocks=(bool, typer.Option(False, "--list-blocks", help="Print each hookable decoder block of --unet "
                                    "(index, name, channels, resolution at --size) and stop.")),
    dataset_options=(Optional[str], typer.Option(
        None, "--dataset-options", help="The dataset reader's options as KEY=VALUE[,KEY=VALUE]: nnunet label=NAME "
                                        "(the one foreground label), qata layout=sgseg|lvit.")))
def extract(common: Optional[dict] = None) -> None:
    """Stage one: run the frozen UNet and text encoder once, write features to the store.

    Re-running computes only what the store lacks; the last line printed is the store's path.
    """
    from extract.run import run_extract

    values, cache_dir = config_values(ExtractConfig, common or {}), (common or {}).get("cache_dir")
    values.pop("cache_dir", None)
    values.pop("dataset_options", None)
    cfg = ExtractConfig(**values, color_order="bgr" if (common or {}).get("bgr") else "rgb",
                        dataset_options=key_values((common or {}).get("dataset_options"), "--dataset-options"),
                        **({"cache_dir": cache_dir} if cache_dir else {}))
    if (common or {}).get("list_blocks"):
        from extract.plan import list_blocks

        typer.echo(f"{'block':>5}  {'name':<28} {'channels':>8}  resolution")
        for k, name, (c, h, w) in list_blocks(cfg):
            typer.echo(f"{k:>5}  {name:<28} {c:>8}  {h}x{w}")
        return
    path = run_extract(cfg, console=err)
    typer.echo(str(path))


def _train_options(command: str) -> dict[str, tuple[Any, Any]]:
    """The options of train command ``command`` as :data:`train.config.COMMAND_OPTIONS` declares them: each
    field's type, default and help from its dataclass (a bool field a single flag), each switch its own."""
    out: dict[str, tuple[Any, Any]] = {}
    for name in COMMAND_OPTIONS[command]:
        if name in SWITCHES:
            out[name] = (bool, typer.Option(False, flag(name), help=SWITCHES[name].help))
        else:
            out[name] = field_option(option_home(name), name)
    return out


def _train_flat(command: str, values: dict[str, Any]) -> dict[str, Any]:
    """A train command's parsed options as FitConfig flat keys (:func:`train.config.flat_from_options`)."""
    fields = {k: v for config in (FitConfig, *MODEL_ARGS.values()) for k, v in config_values(config, values).items()}
    switches = {k: v for k, v in values.items() if k in SWITCHES}
    return flat_from_options(command, {**fields, **switches})


def _train_config(command: str, values: dict[str, Any], **own: Any) -> FitConfig:
    """The FitConfig of a train command's parsed options and its own arguments (cache, out)."""
    return FitConfig.flat(**_train_flat(command, values), **own)


@app.command()
@friendly
@shared_options(**_train_options("fit"))
def fit(
    cache: str = option(FitConfig, "cache"),
    out: Path = option(FitConfig, "out"),
    common: Optional[dict] = None,
) -> None:
    """Stage two: train the cross-attention and pixel classifier from the cache."""
    _fit_and_report(_train_config("fit", common or {}, cache=cache, out=out))


def _fit_and_report(cfg: FitConfig) -> None:
    """Run a fit (any model), say its best epoch, print its folder."""
    from train.fit import fit as run_fit

    metrics = run_fit(cfg, console=err)
    err.print(f"best validation Dice {metrics['best_val_dice']:.4f} at epoch {metrics['best_epoch']}")
    typer.echo(str(cfg.out))


@app.command()
@friendly
@shared_options(**_train_options("baseline"))
def baseline(
    out: Path = option(FitConfig, "out", help="The run folder to write (`pipeline evaluate` scores it)."),
    cache: Optional[str] = option(FitConfig, "cache", default=None, help="A store of the dataset (from `pipeline extract`): its images, masks, splits and views are used; no features needed."),
    dataset: Optional[str] = typer.Option(None, help="Instead of --cache: use the newest complete store of this dataset in --cache-dir (one with d4 views first)."),
    data_root: Optional[Path] = typer.Option(None, help="With --dataset: only a store made from this folder."),
    size: Optional[int] = typer.Option(None, help="With --dataset: only a store of this image size."),
    cache_dir: Optional[str] = typer.Option(None, help="With --dataset: where to look (default: $TEXTDIFF_CACHE_DIR or ~/.cache/textdiff)."),
    common: Optional[dict] = None,
) -> None:
    """The plain U-Net baseline: trained on the same few labelled images as `fit` (same subset, views,
    loss, optimiser, best epoch on validation), on the images alone."""
    from cache.key import default_cache_dir
    from train.data.stores import NoStoreError, baseline_store

    if (cache is None) == (dataset is None):
        raise typer.BadParameter("give either --cache STORE or --dataset NAME (to find its store in --cache-dir)")
    if dataset is not None:
        try:
            cache = str(baseline_store(cache_dir or default_cache_dir(), dataset, data_root, size))
        except NoStoreError as e:
            raise NoStoreError(f"{e}, or pass --cache STORE") from None
        err.print(f"baseline: images of {cache}", highlight=False, soft_wrap=True)
    _fit_and_report(_train_config("baseline", common or {}, cache=cache, out=out))


@app.command()
@friendly
@shared_options(**config_options(EvaluateConfig, flags={"overlays": ("--overlays/--no-overlays",)}))
def evaluate(
    run: Path = typer.Argument(..., help="A `pipeline fit` run folder."),
    common: Optional[dict] = None,
) -> None:
    """Score a run on one split: per_image.csv, summary.json, predictions.npz and overlays in RUN/eval-<split>/
    (RUN/eval-<split>-text-<mode>/ with --text none|shuffled|mirrored)."""
    from train.evaluate import evaluate_cli

    evaluate_cli(run, EvaluateConfig(**config_values(EvaluateConfig, common or {})), console=err)


@app.command()
@friendly
@shared_options(**_train_options("sweep"))
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

    base = _train_flat("sweep", common or {})
    del base["model"]  # the sweep's own
    epochs = base.pop("epochs")
    sweep_cli(cache, out, epochs, base, console=err, grid=grid, scheduler=scheduler, threads=threads)


@app.command()
@friendly
@shared_options(**config_options(PredictConfig, flags={name: (flag(name),) for name in
                                                       ("original_size", "probabilities", "skip_bad")}))
def predict(
    run: Path = typer.Argument(..., help="A `pipeline fit` run folder, or a model folder from `pipeline export`."),
    common: Optional[dict] = None,
) -> None:
    """Segment new images: stage one for them with the run's own UNet and text encoder, then the head.

    --image FILE: one image; --images DIR|TABLE: many (masks, predictions.csv; a rerun skips what is done).
    The last line printed is the mask's path, or predictions.csv's.
    """
    from train.inference.batch import predict_cli

    cfg = PredictConfig(**config_values(PredictConfig, common or {}))
    typer.echo(str(predict_cli(run, cfg, console=err)))  # friendly() names the flags of the keywords it names


@app.command()
@friendly
@shared_options(**config_options(ExportConfig))
def export(
    run: Path = typer.Argument(..., help="A finished `pipeline fit` (or `baseline`) run folder."),
    common: Optional[dict] = None,
) -> None:
    """Write a model folder to share (config.json, model.safetensors, a model card README.md), the Hugging Face
    Hub's model-repository layout; `pipeline predict MODEL_DIR` uses it without the store. The last line printed
    is the folder (or the Hub URL with --push)."""
    from train.export import export_run

    cfg = ExportConfig(**config_values(ExportConfig, common or {}))
    typer.echo(export_run(run, config=cfg, console=err))


@app.command()
@friendly
@shared_options(**config_options(PretrainConfig, skip=("sample_steps", "checkpoint_every", "dataset_options"),
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

    from train.demo.run import demo_runs, run_demo
    from train.demo.report import results_table

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
    from common.progress import stage_progress

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
    from common.progress import stage_progress

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
