"""The paper's Fig. 3: test Dice of one fit per single block and per single step, with and without text.

For a store with blocks B and steps T, the sweep fits ``2·(|B| + |T|)`` heads, all from the same cache:

    b<block>-text / b<block>-notext   blocks=(block,), every step      fusion cross-attn / none
    t<step>-text  / t<step>-notext    steps=(step,),   every block     fusion cross-attn / none

and, with ``grid=True``, ``2·|B|·|T|`` more, one per (block, step) pair:

    b<block>-t<step>-text / -notext   blocks=(block,), steps=(step,)   fusion cross-attn / none

each in ``OUT/runs/<name>`` and evaluated on the test split (no overlays). ``OUT/sweep.csv`` has one
row per run (kind, block, step, text, test_dice, test_iou, val_dice, run; Dice and IoU as fractions;
block or step empty where the run uses all of them), ``OUT/sweep.png`` the heat-map of test Dice % per
single block and step, and with the grid ``OUT/grid.png`` the block × step heat-map. A run whose
``metrics.json`` and ``eval-<split>/summary.json`` (of the weights now in it) exist is reused (after
:func:`train.runs.resume.check_same`: made with the same settings and store); a fit that did not finish is redone
(with ``resume`` in ``base``: continued from its last checkpoint), a finished fit missing its evaluation is only
evaluated, and with ``overwrite`` in ``base`` every cell is fitted afresh.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

import train.evaluate as evaluate_mod
import train.fit as fit_mod
from cache.backends import is_url
from common.errors import OptionError
from cache.store import FeatureStore
from train.runs import rundir
from train.config import FitConfig
from train.data.readers import resolve_selection
from train.runs.resume import check_same
from train.plots import heatmap_png

__all__ = ["CSV_COLUMNS", "SweepRun", "cell_label", "sweep", "sweep_cli", "sweep_plan"]

CSV_COLUMNS = ("kind", "block", "step", "text", "test_dice", "test_iou", "val_dice", "run")
TEXTS = (True, False)  # with text, then without: the order of the plan and of the figures' columns
# FitConfig keys (its flat layout) a sweep sets itself; ``base`` may set any other but the model
_OWN_FIELDS = {"cache", "out", "blocks", "steps", "fusion", "epochs", "model", "model_args"}


@dataclass(frozen=True)
class SweepRun:
    """One cell of the figure."""

    kind: str                # "block" (one block, every step), "step" (one step, every block) or "pair"
    with_text: bool          # cross-attention on the text, or none (ζ1)
    blocks: tuple[int, ...]
    steps: tuple[int, ...]

    @property
    def block(self) -> int | None:
        """The single block, or None where the run uses every block."""
        return self.blocks[0] if self.kind in ("block", "pair") else None

    @property
    def step(self) -> int | None:
        """The single step, or None where the run uses every step."""
        return self.steps[0] if self.kind in ("step", "pair") else None

    @property
    def row_label(self) -> str:
        """b<block>, t<step> or b<block>-t<step>."""
        return cell_label(self.block, self.step)

    @property
    def name(self) -> str:
        return f"{self.row_label}-{'text' if self.with_text else 'notext'}"

    @property
    def fusion(self) -> str:
        """The head's fusion: cross-attention on the text, or none."""
        return "cross-attn" if self.with_text else "none"

    @property
    def text(self) -> str:
        """sweep.csv's ``text`` column: "yes" or "no"."""
        return "yes" if self.with_text else "no"


def cell_label(block: int | str | None, step: int | str | None) -> str:
    """b<block>, t<step> or b<block>-t<step> (None or "" = every block / step)."""
    return "-".join(f"{p}{v}" for p, v in (("b", block), ("t", step)) if v not in (None, ""))


def sweep_plan(blocks: tuple[int, ...], steps: tuple[int, ...], grid: bool = False) -> list[SweepRun]:
    """Every single block (all steps), then every single step (all blocks), then (grid) every
    (block, step) pair; each with text, then without."""
    plan = [SweepRun("block", t, (b,), steps) for b in blocks for t in TEXTS]
    plan += [SweepRun("step", t, blocks, (s,)) for s in steps for t in TEXTS]
    if grid:
        plan += [SweepRun("pair", t, (b,), (s,)) for b in blocks for s in steps for t in TEXTS]
    return plan


def _fit_config(item: SweepRun, cache: Path, out: Path, epochs: int, base: dict[str, Any]) -> FitConfig:
    """The TextDiff fit of one cell (``base``: flat FitConfig keys, as in ``config.json``)."""
    return FitConfig.flat(**{**base, "cache": cache, "out": out / "runs" / item.name, "blocks": item.blocks,
                                "steps": item.steps, "fusion": item.fusion, "epochs": epochs})


def sweep(cache: Path, out: Path, epochs: int, base: dict[str, Any] | None = None,
          console: Console | None = None, split: str = "test", grid: bool = False,
          scheduler: str | None = None, threads: int | None = None) -> Path:
    """Fit and evaluate every cell of Fig. 3; write ``out/sweep.csv`` and ``out/sweep.png`` (and with
    ``grid``, ``out/grid.png``); return the CSV.

    Args:
        cache: the feature store; the sweep covers every block and step it holds.
        out: the sweep folder (``runs/<name>`` per fit, ``sweep.csv``, ``sweep.png``).
        epochs: epochs per fit.
        base: any other :class:`train.config.FitConfig` keys of its flat layout (``config.json``'s), the
            same for every fit (e.g. dim, head_channels, train_count, subset_seed, seed); not cache, out,
            blocks, steps, fusion, epochs, model.
        console: progress and messages; default stderr.
        split: the split each run is evaluated on. Default "test".
        grid: also fit every (block, step) pair alone (the block × step heat-map).
        scheduler: None (here, one fit after another), ``local:N`` (N worker processes here) or a
            dask.distributed scheduler address (``tcp://HOST:PORT``): one fit + evaluation per task, each
            writing its own run folder; on CPUs the results equal a serial sweep's at the same thread count.
        threads: torch threads per worker (default: this process's count, so values match a serial sweep).
    """
    console = console or Console(stderr=True)
    base = dict(base or {})
    known = FitConfig.flat_keys("textdiff")
    bad = sorted(set(base) - (known - _OWN_FIELDS))
    if bad:
        raise ValueError(f"sweep: base cannot set {bad} (the sweep sets {sorted(_OWN_FIELDS)}; "
                         f"other FitConfig fields are {sorted(known - _OWN_FIELDS)})")
    if epochs < 1:
        raise OptionError(f"epochs must be >= 1, got {epochs}", "epochs")
    if scheduler:
        from extract.cluster import check_scheduler

        check_scheduler(scheduler)  # before anything is written
    store = FeatureStore.open(cache)
    if split not in store.splits():
        raise ValueError(f"sweep: store {store.path} has no {split!r} split to evaluate on (it has {store.splits()})")
    blocks, steps = resolve_selection(store, None, None)
    out = Path(out)
    plan = sweep_plan(blocks, steps, grid)
    cells = [_fit_config(item, cache, out, epochs, base) for item in plan]  # their options checked: nothing written yet
    out.mkdir(parents=True, exist_ok=True)
    pairs = ", every pair" if grid else ""
    console.print(f"sweep: {len(plan)} runs ({len(blocks)} blocks × {len(steps)} steps{pairs}, "
                  f"with and without text), {epochs} epoch(s) each → {out}", highlight=False)

    todo = _todo(plan, cells, store, out, split, console)
    rows: list[dict[str, Any]] = []

    def finished() -> None:  # rows in plan order, written after each run: a partial sweep is readable
        while len(rows) < len(plan) and rundir.evaluated(Path(cells[len(rows)].out), split):
            rows.append(_row(plan[len(rows)], Path(cells[len(rows)].out), out, split))
        rundir.write_csv(out / "sweep.csv", rows, CSV_COLUMNS)

    if scheduler:
        for message in todo.values():
            console.print(message, highlight=False)
        _on_cluster([cells[k] for k in todo], cache, split, scheduler, threads, console, finished)
    else:
        for k, message in todo.items():
            console.print(message, highlight=False)
            run_cell(cells[k], str(cache), split, console=console)
            finished()
    finished()

    dice = {(item.row_label, item.with_text): 100 * row["test_dice"] for item, row in zip(plan, rows)}
    _figures(dice, store, blocks, steps, out, split, epochs, grid)
    figures = f"{out / 'sweep.png'}" + (f", {out / 'grid.png'}" if grid else "")
    console.print(f"sweep: {out / 'sweep.csv'}, {figures}", highlight=False)
    return out / "sweep.csv"


def _todo(plan: list[SweepRun], cells: list[FitConfig], store: FeatureStore, out: Path, split: str,
          console: Console) -> dict[int, str]:
    """What each cell still needs (cell → the line said when it starts): a reused cell is checked (same settings
    and store; its files read, so that a damaged one is named before any fit) and said now; an unfinished fit's
    checkpoint is removed unless it is continued."""
    todo: dict[int, str] = {}
    for i, (item, cfg) in enumerate(zip(plan, cells)):
        run, label = Path(cfg.out), f"[{i + 1}/{len(plan)}] {item.name}"
        fitted = rundir.fit_finished(run) and not cfg.overwrite
        evaluated = fitted and rundir.evaluated(run, split)
        if fitted:
            check_same(cfg, store, doing="reuse")
        if evaluated:
            _row(item, run, out, split)
            console.print(f"{label}: reusing the finished run {run}", highlight=False)
        elif fitted:
            todo[i] = f"{label}: reusing the fit, evaluating on {split}"
        else:
            again = rundir.has_checkpoint(run)
            if again and not cfg.resume:
                rundir.remove_checkpoint(run)  # without resume, an unfinished fit is redone
            verb = "continuing the unfinished fit" if again and cfg.resume else "fit"
            todo[i] = f"{label}: {verb} (blocks {list(item.blocks)}, steps {list(item.steps)}, text {item.text})"
    return todo


def _figures(dice: dict[tuple[str, str], float], store: FeatureStore, blocks: tuple[int, ...],
             steps: tuple[int, ...], out: Path, split: str, epochs: int, grid: bool) -> None:
    """sweep.png (test Dice % per single block and single step) and, with ``grid``, grid.png (block × step)."""
    dataset = store.key["dataset"].get("name", "") if isinstance(store.key.get("dataset"), dict) else ""
    about = f"{epochs} epoch{'s' if epochs > 1 else ''} per fit · store {store.key_hash[:12]}"
    labels = [cell_label(b, None) for b in blocks] + [cell_label(None, s) for s in steps]
    table = [[dice[label, t] for t in TEXTS] for label in labels]
    heatmap_png(table, labels, ["with text", "without text"], out / "sweep.png", fmt=".1f",
                title=f"{dataset} {split} Dice (%): single block (all steps), single step (all blocks)\n{about}",
                colorbar_label="Dice (%)", row_breaks=[len(blocks)])
    if grid:
        cols = [(s, t) for t in TEXTS for s in steps]
        table = [[dice[cell_label(b, s), t] for s, t in cols] for b in blocks]
        heatmap_png(table, [cell_label(b, None) for b in blocks],
                    [f"t{s}\n{'text' if t else 'no text'}" for s, t in cols], out / "grid.png", fmt=".1f",
                    title=f"{dataset} {split} Dice (%): one block × one step, with text (left) and without (right)"
                          f"\n{about}", colorbar_label="Dice (%)", col_breaks=[len(steps)])


def _row(item: SweepRun, run: Path, out: Path, split: str) -> dict[str, Any]:
    """The CSV row of a finished, evaluated cell."""
    metrics = rundir.read_metrics(run)
    summary = rundir.read_summary(run, split, entries=rundir.SCORE_ENTRIES)
    return {"kind": item.kind, "block": "" if item.block is None else item.block,
            "step": "" if item.step is None else item.step, "text": item.text,
            "test_dice": round(float(summary["dice"]), 6), "test_iou": round(float(summary["iou"]), 6),
            "val_dice": round(float(metrics["best_val_dice"]), 6), "run": run.relative_to(out).as_posix()}


def run_cell(cfg: FitConfig, cache: str, split: str, console: Console | None = None,
             threads: int | None = None) -> str:
    """One cell: fit it unless finished, then evaluate it on ``split`` (no overlays); returns its folder.
    A dask task on a cluster worker (``threads``: the torch threads it uses), a plain call here."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    console = console or Console(quiet=True)
    if cfg.overwrite or not rundir.fit_finished(Path(cfg.out)):
        fit_mod.fit(cfg, console=console)
    evaluate_mod.evaluate(Path(cfg.out), split=split, cache=cache, overlays=False, console=console,
                          device=cfg.device, precision=cfg.precision)
    return str(cfg.out)


def _on_cluster(cells: list[FitConfig], cache: Path, split: str, scheduler: str, threads: int | None,
                console: Console, finished: Callable[[], None]) -> None:
    """Map the unfinished cells over a dask.distributed cluster, one task each; one progress bar."""
    from distributed import as_completed

    from extract.cluster import connect
    from common.progress import stage_progress

    cache_path = str(cache) if is_url(str(cache)) else str(Path(cache).resolve())  # workers have their own cwd
    with connect(scheduler, threads) as (client, worker_threads):
        jobs = [replace(cfg, cache=cache_path, out=Path(cfg.out).resolve()) for cfg in cells]
        futures = client.map(run_cell, jobs, [cache_path] * len(jobs), [split] * len(jobs),
                             threads=worker_threads, pure=False)
        progress = stage_progress(console, "sweep", "fits")
        with progress:
            task = progress.add_task(f"{len(jobs)} fits on {len(client.nthreads())} workers", total=len(jobs))
            for future in as_completed(futures):
                future.result()
                progress.advance(task, 1)
                finished()


def sweep_cli(cache: Path, out: Path, epochs: int, base: dict[str, Any], console: Console | None = None,
              grid: bool = False, scheduler: str | None = None, threads: int | None = None) -> Path:
    """The body of ``pipeline sweep``: run the sweep, print its table, return the CSV path."""
    from rich.table import Table

    console = console or Console(stderr=True)
    path = sweep(cache, out, epochs, base, console=console, grid=grid, scheduler=scheduler, threads=threads)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    table = Table("", "text", "test Dice %", "test IoU %", "val Dice %", "run", title=f"sweep {out}")
    for r in rows:
        scores = (f"{100 * float(r[k]):.2f}" for k in ("test_dice", "test_iou", "val_dice"))
        table.add_row(cell_label(r["block"], r["step"]), r["text"], *scores, r["run"])
    Console().print(table)
    print(path)
    return path
