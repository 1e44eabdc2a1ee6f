"""The run folder: its file names, atomic writes, the INCOMPLETE mark, the cache-key check, and reading it.

A run folder (``pipeline fit`` / ``pipeline baseline``) holds::

    config.json      {"fit": the FitConfig (flat), "head": the model's constructor arguments, "cache",
                      "dataset", "size", "blocks", "steps", "train_split", "train_ids", "val"}
    cache_key.json   the key of the store it was trained on
    model.safetensors  the model's state dict (best epoch); runs made before it hold ``head.pt`` (still read)
    history.csv      one row per epoch
    loss.png         the loss curve
    metrics.json     the fit's result (written last)
    INCOMPLETE       present while a fit runs
    checkpoint.pt    while a fit runs: its state after the last finished epoch (``fit --resume``); removed
                     once the fit finishes
    eval-<split>/    per_image.csv, summary.json (written last; it names the sha256 of the weights it scored),
                     predictions.npz, overlays/<id>.png
    eval-<split>-text-<mode>/   the same, the head given other text (``evaluate --text none|shuffled|mirrored``)

This module is the only one that names these files; everything else asks it for a path. It imports
no model: :func:`train.runs.loading.load_run` rebuilds a run's model from what :func:`open_run` reads.
It imports only the standard library at first (the scripts read run folders with a bare python3);
torch and the store are imported by the functions that need them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script (python3 train/runs/rundir.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import atomic

if TYPE_CHECKING:
    import torch

    from cache.store import FeatureStore

__all__ = ["CONFIG", "CACHE_KEY", "WEIGHTS", "LEGACY_WEIGHTS", "HISTORY", "LOSS_PLOT", "METRICS", "INCOMPLETE", "CHECKPOINT",
           "PER_IMAGE", "SUMMARY", "PREDICTIONS", "OVERLAYS", "REFIT", "RESTART", "RUN_ENTRIES", "METRIC_ENTRIES",
           "SCORE_ENTRIES", "CacheMismatchError", "Malformed", "RunFileError", "check_cache_key", "eval_dir",
           "clear_evaluations", "evaluated", "evaluated_splits", "fit_finished", "has_checkpoint", "load_checkpoint", "mark_complete",
           "mark_incomplete", "open_run", "read_json", "read_metrics", "read_model_files", "read_run_json",
           "read_summary", "reading", "remove_checkpoint", "save_checkpoint", "save_weights", "load_state_file",
           "load_weights", "weights_file", "weights_sha256", "write_csv", "write_json", "write_model_files"]

CONFIG = "config.json"
CACHE_KEY = "cache_key.json"
WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "head.pt"  # torch.save, before the run folder stored safetensors
HISTORY = "history.csv"
LOSS_PLOT = "loss.png"
METRICS = "metrics.json"
INCOMPLETE = "INCOMPLETE"
CHECKPOINT = "checkpoint.pt"
PER_IMAGE = "per_image.csv"
SUMMARY = "summary.json"
PREDICTIONS = "predictions.npz"
OVERLAYS = "overlays"
EVAL_PREFIX = "eval-"


#: what to do about a damaged file of a finished run (``overwrite=True``: the CLI's ``--overwrite``)
REFIT = "fit the run again with overwrite=True"
#: what to do about a damaged checkpoint
RESTART = "remove it (the fit then starts afresh) or pass overwrite=True instead of resume=True"
#: the entries a finished run's config.json holds that reading it needs, with their JSON types
RUN_ENTRIES: dict[str, type] = {"fit": dict, "head": dict, "cache": str, "blocks": list, "steps": list}
#: the entries of metrics.json and of an evaluation's summary.json that their readers need
METRIC_ENTRIES: dict[str, type] = {"best_epoch": int, "best_val_dice": float}
SCORE_ENTRIES: dict[str, type] = {"dice": float, "iou": float, "dice_std": float, "iou_std": float,
                                  "global_dice": float, "n_images": int}


class CacheMismatchError(ValueError):
    """A run evaluated or continued against a store other than the one it was trained on."""


class RunFileError(ValueError):
    """A file of a run or model folder is missing, damaged or not one textdiff wrote: the one line names it,
    what is wrong and what to do."""

    options = ("overwrite", "resume")  # the keywords its remedies may name (common.errors)


class Malformed(ValueError):
    """Raised within :func:`reading`: what is wrong with the file, in a few words (used as it is)."""


@contextlib.contextmanager
def reading(path: Path, remedy: str = REFIT) -> Iterator[None]:
    """Read or use the file ``path`` within it: any failure (missing, empty, truncated, not JSON, an entry
    missing, tensors not the model's) becomes one :class:`RunFileError` naming it, what is wrong and ``remedy``."""
    try:
        yield
    except RunFileError:
        raise
    except Exception as e:  # noqa: BLE001 - JSON, pickle, zip, safetensors, a missing entry: one line naming the file
        raise RunFileError(f"{path}: {_trouble(Path(path), e)}; {remedy}") from None


def _trouble(path: Path, e: Exception) -> str:
    """What is wrong with the file ``path``, in a few words, from what reading it raised."""
    if isinstance(e, Malformed):
        return str(e)
    if not path.exists():
        return "not found"
    if isinstance(e, PermissionError):
        return f"not readable ({e.strerror})"
    if path.is_file() and path.stat().st_size == 0:
        return "empty (0 bytes)"
    if isinstance(e, KeyError):
        return f"has no {e} entry"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e})"
    found = re.search(r"GLOBAL (\S+)", str(e))
    if found:
        return f"holds a {found[1]}, not only tensors and plain values, so it is not loaded (it could run code)"
    detail = " ".join(str(e).split()).split(". ")[0]
    detail = detail if len(detail) <= 150 else detail[:150] + "..."
    return f"damaged or not a file textdiff wrote ({type(e).__name__}{': ' + detail if detail else ''})"


def _check_entries(data: Any, entries: dict[str, type]) -> None:
    """Refuse ``data`` unless it is a mapping holding ``entries`` (name → type) (:class:`Malformed`)."""
    if not isinstance(data, dict):
        raise Malformed(f"holds a {type(data).__name__}, not a mapping of entries")
    missing = [name for name in entries if name not in data]
    if missing:
        raise Malformed(f"has no {', '.join(map(repr, missing))} entr{'y' if len(missing) == 1 else 'ies'}")
    wrong = [f"{name!r} is a {type(data[name]).__name__}, not a {kind.__name__}"
             for name, kind in entries.items() if not isinstance(data[name], kind)]
    if wrong:
        raise Malformed(f"its entry {'; '.join(wrong)}")


def read_run_json(path: Path, entries: dict[str, type] | None = None, remedy: str = REFIT) -> dict[str, Any]:
    """The JSON object in ``path``, a file of a run or model folder, holding ``entries`` (name → type); else one
    :class:`RunFileError` naming it, what is wrong and ``remedy``."""
    with reading(path, remedy):
        data = json.loads(Path(path).read_text())
        _check_entries(data, entries or {})
        return data


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (:mod:`common.atomic`): a reader never sees half a file."""
    atomic.write_json(path, obj)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write a CSV (a header, then ``rows``) atomically, as :func:`write_json`."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)

    atomic.atomic_write(path, write)


def read_json(path: Path) -> Any:
    """A JSON file's content."""
    return json.loads(Path(path).read_text())


def eval_dir(run: Path, split: str, text: str = "as-is", tta: str = "none") -> Path:
    """Where :func:`train.evaluate.evaluate` writes the results of ``run`` on ``split`` with text mode ``text``
    (:mod:`train.textmodes`) and test-time augmentation ``tta``: ``eval-<split>`` for the text as it is, else
    ``eval-<split>-text-<mode>``; ``-tta-<views>`` after it with test-time augmentation."""
    name = f"{EVAL_PREFIX}{split}" if text == "as-is" else f"{EVAL_PREFIX}{split}-text-{text}"
    return Path(run) / (name if tta == "none" else f"{name}-tta-{tta}")


def evaluated_splits(run: Path) -> list[str]:
    """The splits whose plain evaluation of ``run`` (the text as it is) completed for the weights now in the folder
    (:func:`evaluated`), sorted; not the evaluations with other text (``eval-<split>-text-<mode>``, whose summary
    names its mode)."""
    splits = (d.name.removeprefix(EVAL_PREFIX) for d in Path(run).glob(f"{EVAL_PREFIX}*") if d.is_dir())
    return sorted(split for split in splits if evaluated(run, split)
                  and read_summary(run, split).get("text", "as-is") == "as-is"
                  and read_summary(run, split).get("tta", "none") == "none")


def clear_evaluations(run: Path) -> list[Path]:
    """Remove every ``eval-*`` folder of ``run`` (before a fit overwrites its weights); returns them."""
    gone = sorted(d for d in Path(run).glob(f"{EVAL_PREFIX}*") if d.is_dir())
    for d in gone:
        shutil.rmtree(d)
    return gone


def mark_incomplete(run: Path) -> None:
    """Create the folder and mark it: its files are not to be trusted until :func:`mark_complete`."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / INCOMPLETE).write_text("this fit has not finished; its files are not to be trusted\n")


def mark_complete(run: Path) -> None:
    """Remove the INCOMPLETE mark (after every file is written)."""
    (Path(run) / INCOMPLETE).unlink()


def fit_finished(run: Path) -> bool:
    """A fit wrote every file (``metrics.json`` last) and its ``INCOMPLETE`` mark is gone."""
    return (Path(run) / METRICS).is_file() and not (Path(run) / INCOMPLETE).exists()


def evaluated(run: Path, split: str, text: str = "as-is", tta: str = "none") -> bool:
    """A finished fit whose evaluation on ``split`` (with text mode ``text``, test-time augmentation ``tta``)
    completed (its ``summary.json`` is written last) and scored the weights now in the folder (the summary's
    ``weights_sha256``; a summary without one, or of other weights, is stale)."""
    if not (fit_finished(run) and (eval_dir(run, split, text, tta) / SUMMARY).is_file()):
        return False
    recorded = read_summary(run, split, text, tta=tta).get("weights_sha256")
    return recorded is not None and recorded == weights_sha256(run)


def read_summary(run: Path, split: str, text: str = "as-is", entries: dict[str, type] | None = None,
                 tta: str = "none") -> dict[str, Any]:
    """The ``summary.json`` of ``run``'s evaluation on ``split`` (text mode ``text``, test-time augmentation
    ``tta``), holding ``entries`` (e.g. :data:`SCORE_ENTRIES`; a damaged one: :class:`RunFileError`)."""
    mode = ("" if text == "as-is" else f" --text {text}") + ("" if tta == "none" else f" --tta {tta}")
    again = f"evaluate the run again (`pipeline evaluate {run} --split {split}{mode}`)"
    return read_run_json(eval_dir(run, split, text, tta) / SUMMARY, entries, again)


def read_metrics(run: Path) -> dict[str, Any]:
    """A finished fit's ``metrics.json`` (a damaged one: :class:`RunFileError`)."""
    return read_run_json(Path(run) / METRICS, METRIC_ENTRIES)


def check_cache_key(run: Path, store: FeatureStore) -> None:
    """Refuse ``store`` unless its key is the one ``run`` was trained on (:class:`CacheMismatchError`)."""
    from cache.key import key_hash

    expected = read_run_json(Path(run) / CACHE_KEY)
    if key_hash(store.key) != key_hash(expected):
        raise CacheMismatchError(f"store {store.path} (key {key_hash(store.key)[:12]}) is not the one run {run} "
                                 f"was trained on (key {key_hash(expected)[:12]}); its features would not match")


def open_run(run: Path, cache: Path | str | None = None) -> tuple[dict[str, Any], FeatureStore]:
    """A finished run's ``config.json`` and its store (``cache`` or the one it recorded), key checked."""
    run = Path(run)
    if (run / INCOMPLETE).exists():
        raise ValueError(f"run {run} is incomplete (its fit did not finish); fit it again")
    if not (run / CONFIG).is_file():
        from common.errors import naming

        raise naming(FileNotFoundError(f"{run / CONFIG} not found: is {run} a fit run folder? (If it is, {REFIT}.)"),
                     "overwrite")
    from cache.store import FeatureStore

    config = read_run_json(run / CONFIG, RUN_ENTRIES)
    store = FeatureStore.open(cache or config["cache"])
    check_cache_key(run, store)
    return config, store


def write_model_files(directory: Path, head: dict[str, Any], state: dict[str, torch.Tensor],
                      config: dict[str, Any] | None = None) -> None:
    """The weights and ``config.json`` (``config`` with ``head`` set, as in a run) into ``directory``."""
    save_weights(directory, state)
    write_json(Path(directory) / CONFIG, {**(config or {}), "head": head})


def save_weights(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """The model's state dict as ``model.safetensors`` in ``directory`` (created if need be), atomically; an
    older run's ``head.pt`` is removed, so the folder holds one set of weights."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic.atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    (directory / LEGACY_WEIGHTS).unlink(missing_ok=True)


def weights_file(directory: Path) -> Path:
    """The weights of a run folder: ``model.safetensors``, or an older run's ``head.pt`` (the first if neither)."""
    directory = Path(directory)
    legacy = directory / LEGACY_WEIGHTS
    return legacy if legacy.is_file() and not (directory / WEIGHTS).is_file() else directory / WEIGHTS


def weights_sha256(directory: Path) -> str | None:
    """Hex sha256 of the run folder's weights file (None when it has none): what an evaluation scored."""
    path = weights_file(directory)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(directory: Path, map_location: str | torch.device = "cpu", remedy: str = REFIT
                 ) -> dict[str, torch.Tensor]:
    """The state dict of a run folder (:func:`weights_file`; a damaged one: :class:`RunFileError`)."""
    return load_state_file(weights_file(directory), map_location, remedy)


def load_state_file(path: Path, map_location: str | torch.device = "cpu", remedy: str = REFIT
                    ) -> dict[str, torch.Tensor]:
    """A weights file's state dict: safetensors, or an older run's ``head.pt`` (``torch.load(weights_only=True)``);
    one that is missing, damaged or not a mapping of names to tensors is one :class:`RunFileError` (``remedy``)."""
    import torch

    path = Path(path)
    with reading(path, remedy):
        if path.name == LEGACY_WEIGHTS:
            state = torch.load(path, map_location=map_location, weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(path), device=str(map_location))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise Malformed("holds no state dict (a mapping of names to tensors)")
        return state


def save_checkpoint(run: Path, state: dict[str, Any]) -> None:
    """A fit's resumable ``state`` as ``checkpoint.pt``, atomically (temporary file, then rename): tensors
    and plain values only, so that :func:`load_checkpoint` can refuse anything else."""
    import torch

    atomic.atomic_write(Path(run) / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def has_checkpoint(run: Path) -> bool:
    """``run`` holds a fit's checkpoint (:func:`save_checkpoint`)."""
    return (Path(run) / CHECKPOINT).is_file()


def load_checkpoint(run: Path, entries: dict[str, type] | None = None) -> dict[str, Any]:
    """The checkpoint of ``run``, on the CPU, loaded with ``weights_only=True`` (nothing in it can run code),
    holding ``entries`` (name → type); a damaged one is one :class:`RunFileError` naming it."""
    import torch

    path = Path(run) / CHECKPOINT
    with reading(path, RESTART):
        state = torch.load(path, map_location="cpu", weights_only=True)
        _check_entries(state, entries or {})
        return state


def remove_checkpoint(run: Path) -> None:
    """Remove the checkpoint of ``run`` (and a temporary one left by a kill), if any."""
    path = Path(run) / CHECKPOINT
    atomic.tmp_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def read_model_files(directory: Path, map_location: str | torch.device = "cpu"
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the model's constructor arguments, its state dict) from a run folder or a saved model.

    A ``config.json`` without a ``head`` entry is the older layout of ``TextDiffHead.save``: the
    arguments themselves."""
    directory = Path(directory)
    config = read_run_json(directory / CONFIG)
    head = config["head"] if isinstance(config.get("head"), dict) else config
    return head, load_weights(directory, map_location)


def main(argv: Sequence[str] | None = None) -> int:
    """For shell scripts, which ask this module rather than name the files (a bare ``python3`` will do)::

        python3 train/runs/rundir.py finished RUN            exit 0 when the fit finished, else 1
        python3 train/runs/rundir.py evaluated RUN SPLIT [TEXT]  exit 0 when its evaluation on SPLIT (with text mode
                                                        TEXT, default as-is) completed
        python3 train/runs/rundir.py value RUN NAME [SPLIT]  print metrics.json's NAME (with SPLIT: the summary's)
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["finished"] and len(args) == 2:
        return 0 if fit_finished(Path(args[1])) else 1
    if args[:1] == ["evaluated"] and len(args) in (3, 4):
        return 0 if evaluated(Path(args[1]), *args[2:]) else 1
    if args[:1] == ["value"] and len(args) in (3, 4):
        run = Path(args[1])
        source = eval_dir(run, args[3]) / SUMMARY if len(args) == 4 else run / METRICS
        print(read_json(source)[args[2]])
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
