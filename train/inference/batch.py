"""Batch prediction: ``pipeline predict RUN --images DIR|TABLE [--texts TABLE] --out DIR``.

One :class:`train.inference.predictor.Predictor` (a run, or a model folder from ``pipeline export``) for every image;
the images go through it in groups (:meth:`~train.inference.predictor.Predictor.group_size`: whole UNet forwards of
the store's batch shape, whole model batches), under one progress bar. ``OUT`` holds, per image (named
after its stem; two images with one stem are refused before anything is read)::

    <stem>_mask.png   {0, 255}: the argmax, at the model's size (the image's, nearest, with original_size)
    <stem>_prob.npy   with probabilities: float16 (H, W), the foreground probability, at the mask's size
                      (bilinear with original_size)
    predictions.csv   one row per image, in input order: image (as listed), text (the one used; an image
                      without a row in the texts table gets the empty text: no text, every token withheld), foreground_fraction (of the mask
                      written), truncated (the text had more tokens than the run's max length and was cut),
                      mask, probabilities (file names), error (why a bad image was skipped)
    predict.json      the model (:meth:`~train.inference.predictor.Predictor.fingerprint`), original_size and precision they
                      were made with (and tta, with test-time augmentation)

Every file is written atomically (a temporary file, then a rename), and predictions.csv after each group,
so a killed run leaves only complete files. A rerun computes only the images whose outputs are not all
there, whose text changed or that failed, keeps the rows of the others, and rewrites no file whose
content is unchanged: a rerun of a finished batch writes nothing. Another model, ``original_size`` or
``precision`` into the same folder is refused. A missing or unreadable image stops the batch with one error naming it
(what was written before stays), or with ``skip_bad`` is named, listed with its error, and skipped.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape

from common.errors import OptionError, naming
from common import atomic
from extract.datasets import IMAGE_EXTS, DatasetError, quiet_decoders, read_column, read_image, read_table
from common.progress import stage_progress
from train.config import PredictConfig
from train.inference.predictor import Predictor, mask_path, predict, resize_to, warn_device
from train.runs.rundir import read_json, write_json

__all__ = ["COLUMNS", "PREDICTIONS", "SETTINGS", "BatchResult", "ImageJob", "list_images", "predict_batch",
           "predict_cli"]

COLUMNS = ("image", "text", "foreground_fraction", "truncated", "mask", "probabilities", "error")
PREDICTIONS = "predictions.csv"
SETTINGS = "predict.json"
MASK_SUFFIX = "_mask.png"
PROB_SUFFIX = "_prob.npy"
_TMP = atomic.TMP_SUFFIX
_TABLES = (".csv", ".xlsx")


@dataclass(frozen=True)
class ImageJob:
    """One listed image: its name as listed, its file, the text it is segmented with."""

    name: str
    path: Path
    text: str

    def mask_file(self, out: Path) -> Path:
        return Path(out) / f"{self.path.stem}{MASK_SUFFIX}"

    def prob_file(self, out: Path) -> Path:
        return Path(out) / f"{self.path.stem}{PROB_SUFFIX}"


@dataclass
class BatchResult:
    """What :func:`predict_batch` did."""

    out: Path
    table: Path                                   # predictions.csv
    written: int = 0                              # images segmented by this call
    kept: int = 0                                 # images whose outputs were already complete
    skipped: list[tuple[str, str]] = field(default_factory=list)   # bad images: (name, why)


def list_images(images: Path) -> list[tuple[str, Path]]:
    """(name as listed, file) of ``images``: a folder's image files (by name), or a .csv/.xlsx table's column
    ``image`` (paths relative to the table's folder, in its order)."""
    images = Path(images)
    if images.is_dir():
        found = [(p.name, p) for p in sorted(images.iterdir())
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS]
        if not found:
            raise OptionError(f"images: folder {images} holds no image files ({', '.join(IMAGE_EXTS)})", "images")
        return found
    if images.is_file() and images.suffix.lower() in _TABLES:
        return [(name, images.parent / name) for name in read_column(images, "image")]
    if not images.exists():
        raise OptionError(f"images: {images} not found", "images")
    raise OptionError(f"images: {images} is neither a folder nor a .csv/.xlsx table of image paths", "images")


def _jobs(images: Path, texts: Path | None, out: Path, console: Console) -> list[ImageJob]:
    """The listed images with their texts; output names shared by two images, or an ``out`` that is the
    images folder, refused."""
    listed = list_images(images)
    if Path(images).is_dir() and Path(out).resolve() == Path(images).resolve():
        raise OptionError(f"out: {out} is the images folder; its masks would be read as images by the next run",
                          "out")
    by_stem: dict[str, list[str]] = {}
    for name, path in listed:
        by_stem.setdefault(path.stem, []).append(name)
    clashes = [names for names in by_stem.values() if len(names) > 1]
    if clashes:
        shown = "; ".join(", ".join(names) for names in clashes[:5]) + (" ..." if len(clashes) > 5 else "")
        raise OptionError(f"images: {len(clashes)} output name(s) would be shared by several images (outputs are "
                          f"named after the stem): {shown}; rename them or list them in separate runs", "images")
    table: dict[str, str] = {}
    if texts is not None:
        for row in read_table(Path(texts)):
            if row.image in table:
                raise DatasetError(f"{texts}: {row.where}: image {row.image!r} has a text already")
            table[row.image] = row.text
    jobs, used = [], set()
    for name, path in listed:
        key = next((k for k in (name, Path(name).name, Path(name).stem) if k in table), None)
        used.add(key)
        jobs.append(ImageJob(name, path, table.get(key, "") if key is not None else ""))
    unused = [k for k in table if k not in used]
    if unused:
        console.print(f"[yellow]note[/]: {len(unused)} row(s) of {escape(str(texts))} name no listed image "
                      f"(e.g. {escape(repr(unused[:3]))})", highlight=False, soft_wrap=True)
    return jobs


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` in ``out``, or refuse a folder whose outputs were made with others."""
    path = out / SETTINGS
    if not path.is_file():
        write_json(path, settings)
        return
    recorded = read_json(path)
    differ = [k for k in settings if recorded.get(k) != settings[k]]
    if differ:
        what = " and ".join("another model" if k == "model" else f"{k}={recorded.get(k)!r}" for k in differ)
        raise OptionError(f"out: {out} holds predictions made with {what}; pass another out=DIR, or empty it", "out")


def _previous_rows(out: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier run's predictions.csv, by image (none if absent or of another layout)."""
    path = out / PREDICTIONS
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            return {}
        return {r["image"]: r for r in reader}


def _write_table(out: Path, jobs: Sequence[ImageJob], rows: dict[str, dict[str, Any]]) -> None:
    """predictions.csv: the rows in input order, written atomically, and only when its content changes."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[j.name] for j in jobs if j.name in rows)
    path = out / PREDICTIONS
    if path.is_file() and path.read_text(encoding="utf-8") == buffer.getvalue():
        return
    atomic.write_text(path, buffer.getvalue())


def _row(job: ImageJob, out: Path, mask: np.ndarray | None = None, truncated: bool = False, error: str = ""
         ) -> dict[str, Any]:
    prob = job.prob_file(out)
    return {"image": job.name, "text": job.text,
            "foreground_fraction": "" if mask is None else f"{float(mask.mean()):.6f}",
            "truncated": "" if mask is None else str(bool(truncated)),
            "mask": "" if mask is None else job.mask_file(out).name,
            "probabilities": prob.name if mask is not None and prob.is_file() else "", "error": error}


def _write_outputs(job: ImageJob, out: Path, probs: np.ndarray, height_width: tuple[int, int],
                   original_size: bool, with_probabilities: bool) -> np.ndarray:
    """Write the image's mask (and probability map); return the {0, 1} mask written."""
    mask = probs.argmax(0).astype(np.uint8)
    foreground = probs[1:].sum(0)
    if original_size:
        mask = resize_to(mask, height_width, "L")
        foreground = resize_to(foreground.astype(np.float32), height_width, "F")
    if with_probabilities:
        atomic.write_stream(job.prob_file(out), lambda f: np.save(f, foreground.astype(np.float16)))
    else:
        job.prob_file(out).unlink(missing_ok=True)  # an earlier run's, for another text: stale
    atomic.write_stream(job.mask_file(out), lambda f: Image.fromarray(mask * 255, "L").save(f, format="PNG"))
    return mask


def _read(job: ImageJob, predictor: Predictor, skip_bad: bool) -> tuple[np.ndarray, tuple[int, int]] | str:
    """The image as the store reads one, or (with ``skip_bad``) why it cannot be read."""
    try:
        with quiet_decoders():
            return read_image(job.path, predictor.size, predictor.color_order)
    except (DatasetError, FileNotFoundError) as e:
        if not skip_bad:
            raise naming(DatasetError(f"{e}; skip_bad=True goes on without it"), "skip_bad") from None
        return str(e)


def predict_batch(run: Path, images: Path, out: Path, texts: Path | None = None, cache: Path | str | None = None,
                  original_size: bool = PredictConfig.original_size,
                  probabilities: bool = PredictConfig.probabilities, skip_bad: bool = PredictConfig.skip_bad,
                  *, unet: str | None = None, text_encoder: str | None = None, device: str | None = None,
                  precision: str = PredictConfig.precision, tta: str = PredictConfig.tta,
                  console: Console | None = None) -> BatchResult:
    """Segment every image ``images`` lists (:func:`list_images`) with ``run`` (a run folder or a model
    folder) into folder ``out`` (see the module's docstring for what it holds); texts from the table
    ``texts`` (columns image, text).

    Raises (before any model is loaded) :class:`common.errors.OptionError` for a bad listing or two images with
    one output name, and, without ``skip_bad``, :class:`extract.datasets.DatasetError` naming a missing image;
    during the run, one naming an unreadable image (what was written before it stays, and a rerun resumes).
    """
    console = console or Console(stderr=True)
    out = Path(out)
    jobs = _jobs(Path(images), texts, out, console)
    missing = [j for j in jobs if not j.path.is_file()]
    if missing and not skip_bad:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise naming(DatasetError(f"image not found: {missing[0].path}{more}; skip_bad=True goes on without it"),
                     "skip_bad")
    predictor = Predictor.from_run(run, cache, unet=unet, text_encoder=text_encoder, device=device,
                                   precision=precision, tta=tta)
    warn_device(predictor, console)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in (f"*{MASK_SUFFIX}{_TMP}", f"*{PROB_SUFFIX}{_TMP}", f"{PREDICTIONS}{_TMP}"):
        for leftover in out.glob(pattern):  # a killed run's half-written files
            leftover.unlink()
    _check_settings(out, {"model": predictor.fingerprint(), "original_size": original_size, "precision": precision,
                          **({"tta": tta} if tta != "none" else {})})

    result, absent = BatchResult(out, out / PREDICTIONS), {j.name for j in missing}
    previous, rows = _previous_rows(out), {}
    todo = []

    def skip(job: ImageJob, why: str) -> None:
        result.skipped.append((job.name, why))
        rows[job.name] = _row(job, out, error=why)
        console.print(f"[yellow]skipped[/]: {escape(why)}", highlight=False, soft_wrap=True)

    for job in jobs:
        before = previous.get(job.name)
        done = job.mask_file(out).is_file() and (not probabilities or job.prob_file(out).is_file())
        if job.name in absent:
            skip(job, f"image not found: {job.path}")
        elif done and before is not None and not before["error"] and before["text"] == job.text:
            rows[job.name] = {**before, "probabilities": job.prob_file(out).name if job.prob_file(out).is_file()
                              else ""}
            result.kept += 1
        else:
            todo.append(job)
    note = predictor.inputs.no_text_note([j.text for j in todo])
    if note:
        console.print(f"[yellow]note[/]: {note}", highlight=False, soft_wrap=True)

    truncated = _segment(todo, jobs, predictor, out, rows, result, skip, original_size, probabilities, skip_bad,
                         console)
    if truncated:
        console.print(f"[yellow]note[/]: {truncated} text(s) longer than the run's "
                      f"{predictor.stage_one.text['max_length']} tokens were truncated, as during extraction "
                      f"(predictions.csv: truncated)", highlight=False, soft_wrap=True)
    console.print(f"predict: {result.written} image(s) segmented, {result.kept} already done, "
                  f"{len(result.skipped)} skipped → {escape(str(out))}", highlight=False, soft_wrap=True)
    return result


def _segment(todo: list[ImageJob], jobs: list[ImageJob], predictor: Predictor, out: Path,
             rows: dict[str, dict[str, Any]], result: BatchResult, skip: Callable[[ImageJob, str], None],
             original_size: bool, probabilities: bool, skip_bad: bool, console: Console) -> int:
    """Segment the ``todo`` jobs a group at a time (whole UNet forwards and model batches), writing each image's
    outputs and predictions.csv after each group; returns how many texts were truncated."""
    group, truncated = predictor.group_size(), 0
    progress = stage_progress(console, "predict", "images")
    try:
        with progress:
            task = progress.add_task(f"{len(todo)} of {len(jobs)} images → {out.name}", total=len(todo))
            for start in range(0, len(todo), group):
                chunk = todo[start:start + group]
                loaded = []
                for job in chunk:
                    got = _read(job, predictor, skip_bad)
                    if isinstance(got, str):
                        skip(job, got)
                    else:
                        loaded.append((job, *got))
                if loaded:
                    probs = predictor.probabilities(np.stack([img for _, img, _ in loaded]),
                                                    [job.text for job, _, _ in loaded])
                    cut = predictor.truncations([job.text for job, _, _ in loaded])
                    for (job, _, hw), p, was_cut in zip(loaded, probs, cut):
                        mask = _write_outputs(job, out, p, hw, original_size, probabilities)
                        rows[job.name] = _row(job, out, mask, was_cut)
                        result.written += 1
                        truncated += was_cut
                progress.advance(task, len(chunk))
                _write_table(out, jobs, rows)
    finally:
        _write_table(out, jobs, rows)
    return truncated


def predict_cli(run: Path, cfg: PredictConfig, console: Console | None = None) -> Path:
    """The body of ``pipeline predict``: one image (``cfg.image``: :func:`train.inference.predictor.predict`, a line with
    its foreground) or many (``cfg.images``: :func:`predict_batch`). Returns the path to print last: the
    mask, or predictions.csv."""
    console = console or Console(stderr=True)
    if (cfg.image is None) == (cfg.images is None):
        raise OptionError("pass image=FILE (one image) or images=DIR (a folder or a table of images), "
                          f"{'not both' if cfg.image is not None else 'one of them'}", "image", "images")
    models = dict(cache=cfg.cache, unet=cfg.unet, text_encoder=cfg.text_encoder, device=cfg.device,
                  precision=cfg.precision, tta=cfg.tta, console=console)
    if cfg.images is not None:
        if cfg.text:
            raise OptionError("text goes with image=FILE; give many images their texts with texts=TABLE", "text",
                              "image", "texts")
        return predict_batch(run, cfg.images, cfg.out, cfg.texts, original_size=cfg.original_size,
                             probabilities=cfg.probabilities, skip_bad=cfg.skip_bad, **models).table
    extra = next((k for k in ("texts", "probabilities", "skip_bad") if getattr(cfg, k) not in (None, False)), None)
    if extra is not None:
        raise OptionError(f"{extra} goes with images=DIR, not with one image=FILE", extra, "images", "image")
    mask = predict(run, cfg.image, cfg.text, cfg.out, original_size=cfg.original_size, **models)
    console.print(f"{mask.mean():.1%} of {mask.shape[1]}x{mask.shape[0]} pixels foreground")
    return mask_path(cfg.out, cfg.image)
