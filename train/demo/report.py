"""The demo's report: a results table and the pictures a person would look at, as Markdown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.runs import rundir
from train.plots import pretrain_curve_png


def results_table(runs: dict[str, Path], split: str = "test") -> list[dict[str, Any]]:
    """One row per run: its evaluation summary on ``split`` and its fit metrics."""
    rows = []
    for name, run in runs.items():
        summary = rundir.read_json(rundir.eval_dir(run, split) / rundir.SUMMARY)
        metrics = rundir.read_json(Path(run) / rundir.METRICS)
        rows.append({"run": name, "dice": summary["dice"], "dice_std": summary["dice_std"], "iou": summary["iou"],
                     "global_dice": summary["global_dice"], "n_images": summary["n_images"],
                     "best_epoch": metrics["best_epoch"], "fit_seconds": metrics["seconds"]})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| run | Dice % | IoU % | global Dice % | test images | best epoch | fit time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {100 * r['dice']:.2f} ± {100 * r['dice_std']:.2f} | {100 * r['iou']:.2f} | "
                     f"{100 * r['global_dice']:.2f} | {r['n_images']} | {r['best_epoch']} | {r['fit_seconds']:.0f} s |")
    return "\n".join(lines)


def write_report(out: Path, pretrain_dir: Path, runs: dict[str, Path], commands: Sequence[str],
                 store: Path, n_overlays: int = 3, split: str = "test", denoising: Path | None = None,
                 iterations: int | None = None) -> Path:
    """``out/report.md`` with the table, the overlays of the first test images for every run side by
    side, the fits' and the pretraining's loss curves, and what the pretrained UNet does where the
    features come from (``denoising``: :func:`train.demo.run.denoising_png`'s figure)."""
    out = Path(out)
    rows = results_table(runs, split)
    pretrain_curve_png(pretrain_dir / "train_log.csv", out / "pretrain_loss.png")

    def rel(p: Path) -> str:
        return Path(p).resolve().relative_to(out.resolve()).as_posix()

    parts = ["# textdiff demo", "",
             "A synthetic set where the text is necessary: identical discs lie in four regions (top, right, bottom, "
             "left; told apart by their tint), and only those in the regions the text names are in the mask. "
             "A diffusion UNet is pretrained on the unlabelled training images, stage one caches its features "
             "and the MiniLM token embeddings, and stage two fits the head twice from that one cache: with the "
             "text, and without (`--no-text`).", "",
             f"## Results ({split} split)", "", markdown_table(rows), ""]
    first, second = rows[0], rows[-1]
    if len(rows) > 1:
        gap = 100 * (first["dice"] - second["dice"])
        parts += [f"**{first['run']} − {second['run']}: {gap:+.2f} Dice points.**", ""]
    parts += ["## Predictions", "", "Image | ground truth (green) | prediction (red), for the first test images:", ""]
    for name, run in runs.items():
        overlays = sorted((rundir.eval_dir(run, split) / rundir.OVERLAYS).glob("*.png"))[:n_overlays]
        parts += [f"### {name}", ""] + [f"![{name} {p.stem}]({rel(p)})" for p in overlays] + [""]
    parts += ["## Training", "", "Fits (train loss, validation Dice):", ""]
    parts += [f"![{name} loss]({rel(run / rundir.LOSS_PLOT)})" for name, run in runs.items()] + [""]
    trained = f"after {iterations} iterations" if iterations else "after its pretraining"
    parts += ["Diffusion pretraining (L_simple per iteration):", "", f"![pretraining loss]({rel(out / 'pretrain_loss.png')})",
              ""]
    if denoising is not None:
        parts += [f"What the pretrained UNet does {trained}, where the features come from: a test image noised "
                  "to t = 50, 150, 250 (rows) with the store's noise; x_t | the UNet's estimate of the clean "
                  "image from x_t | the image:", "", f"![denoising]({rel(denoising)})", ""]
    parts += [f"Samples drawn from pure noise (ancestral sampling, `{rel(pretrain_dir / 'samples.png')}`) need far "
              "more training than denoising a real image at t ≤ 250: after a few hundred iterations they are "
              "still noise. That is expected, not a bug.", "",
              "## How this was made", "", f"Feature store: `{store}`", "", "```bash", *commands, "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
