"""Resumable fits: what a fit's checkpoint holds, when a fit may continue from it, and restoring it.

After every epoch :func:`train.fit.fit` saves (atomically, :func:`train.runs.rundir.save_checkpoint`) the
model's state dict (BatchNorm statistics included), Adam's state (moments and step counts), the
learning-rate schedule, the best epoch so far (its weights, epoch and validation scores), the random
states (torch's CPU generator, the fit's CUDA device's on a GPU, the numpy Generator of order and augmentation,
as JSON text), the history rows so far, and the fit's settings and store key, to refuse a resume with
other ones. Tensors and plain values only: it is loaded with ``weights_only=True``. On a CPU a resumed
fit is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import OptionError
from cache.key import key_hash
from cache.store import FeatureStore
from train.runs import rundir
from train.config import FitConfig

__all__ = ["PAUSE_ENV", "FitState", "check_same", "checkpoint_state", "finished", "pause_after", "restore",
           "resumable"]

PAUSE_ENV = "TEXTDIFF_TEST_PAUSE_AFTER_EPOCH"
#: the entries of a checkpoint (:func:`checkpoint_state`) that :func:`resumable` and :func:`restore` read
CHECKPOINT_ENTRIES: dict[str, type] = {"epoch": int, "model": dict, "optim": dict, "schedule": dict, "best": dict,
                                       "history": list, "torch_rng": torch.Tensor, "numpy_rng": str,
                                       "cuda_rng": list, "fit": dict, "cache_key_hash": str}


class FitState:
    """What a fit's loop carries from epoch to epoch besides the model, optimiser and schedule."""

    def __init__(self, epoch: int = 0, best: dict[str, Any] | None = None,
                 history: list[dict[str, float]] | None = None, best_no_text: dict[str, Any] | None = None) -> None:
        self.epoch = epoch
        self.best: dict[str, Any] = best or {"val_dice": -1.0}
        self.history: list[dict[str, float]] = history or []
        #: a head with a no-text classifier: that classifier's best epoch on validation without text
        self.best_no_text: dict[str, Any] = best_no_text or {"val_dice": -1.0}


def _cuda_rng(device: torch.device) -> list[torch.Tensor]:
    """The random state of the fit's own CUDA device (none on a CPU: CUDA is not initialised for it)."""
    return [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []


def checkpoint_state(fit: FitState, model: torch.nn.Module, optim: torch.optim.Optimizer,
                     schedule: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator,
                     cfg: FitConfig, store: FeatureStore, scaler: torch.amp.GradScaler | None = None,
                     device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Everything :func:`restore` needs to continue after ``fit.epoch``, as tensors and plain values
    (``scaler``: fp16's loss scale; ``device``: the fit's, whose CUDA random state is kept, one device's only,
    so that the checkpoint resumes on a machine with another GPU count)."""
    sched = schedule.state_dict()
    sched["milestones"] = dict(sched.get("milestones", {}))  # a Counter: kept as a plain dict
    return {"epoch": fit.epoch, "model": model.state_dict(), "optim": optim.state_dict(), "schedule": sched,
            "best": fit.best, "best_no_text": fit.best_no_text, "history": fit.history,
            "torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(rng.bit_generator.state),
            "cuda_rng": _cuda_rng(device),
            "fit": cfg.to_json(), "cache_key_hash": key_hash(store.key),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}}


def restore(state: dict[str, Any], model: torch.nn.Module, optim: torch.optim.Optimizer,
            schedule: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator,
            scaler: torch.amp.GradScaler | None = None, device: torch.device = torch.device("cpu")) -> FitState:
    """Load ``state`` (a checkpoint) into the freshly built model, optimiser, schedule and generators; a CUDA
    random state goes to the fit's own device (an older checkpoint's first one)."""
    model.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    sched = dict(state["schedule"])
    sched["milestones"] = Counter({int(k): v for k, v in sched.get("milestones", {}).items()})
    schedule.load_state_dict(sched)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"][0], device)
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return FitState(int(state["epoch"]), copy.deepcopy(state["best"]), list(state["history"]),
                    copy.deepcopy(state.get("best_no_text")))


def check_same(cfg: FitConfig, store: FeatureStore, *recorded: dict[str, Any], doing: str = "resume") -> None:
    """The one reuse check (``resume`` here, a sweep's finished cells): refuse to ``doing`` ``cfg.out`` with
    settings other than its ``config.json``'s (and ``recorded``: other ``fit`` entries, e.g. a checkpoint's), or
    from a store other than its ``cache_key.json``'s (:class:`train.runs.rundir.CacheMismatchError`). An older run's
    settings are read as today's config reads them: options added since count at their defaults."""
    out = Path(cfg.out)
    with rundir.reading(out / rundir.CONFIG):  # settings it cannot read: one line naming it
        differ = sorted({d for fit_json in (_recorded(out), *recorded) for d in cfg.differences(fit_json)})
    if differ:
        raise ValueError(f"cannot {doing} {out}: it was fitted with other settings ({', '.join(differ)}); "
                         f"fit with those, or into another out folder")
    if (out / rundir.CACHE_KEY).is_file():
        rundir.check_cache_key(out, store)


def _recorded(out: Path) -> dict[str, Any]:
    """The ``fit`` entry of ``out``'s config.json ({} without one; a damaged one: :class:`rundir.RunFileError`)."""
    if not (out / rundir.CONFIG).is_file():
        return {}
    return rundir.read_run_json(out / rundir.CONFIG).get("fit", {})


def finished(cfg: FitConfig, store: FeatureStore) -> bool:
    """With ``resume``: ``cfg.out`` holds a finished fit of the same settings and store (nothing to do). Without
    it, a finished fit there is refused unless ``overwrite`` (:class:`OptionError`): its weights and evaluations
    would silently give way to another fit's."""
    out = Path(cfg.out)
    if not rundir.fit_finished(out):
        return False
    if not cfg.resume:
        if cfg.overwrite:
            return False
        raise OptionError(f"{out} holds a finished run: pass overwrite=True to fit it again (its evaluations are "
                          f"removed), resume=True to keep it, or choose another out=DIR", "overwrite", "resume", "out")
    check_same(cfg, store)
    rundir.remove_checkpoint(out)  # left by a fit killed as it finished, if any
    return True


def resumable(cfg: FitConfig, store: FeatureStore) -> dict[str, Any] | None:
    """The checkpoint to continue ``cfg.out`` from, or None to start afresh (the rules of ``resume``).

    Without ``resume``, an unfinished run folder holding a checkpoint is refused (:class:`OptionError`
    naming ``resume``); with it, the checkpoint must have been made with the same settings (the run's
    ``config.json`` and the checkpoint's own record) and store key, or the differences are named. A
    folder without a checkpoint (a fit killed in its first epoch, or none yet) starts afresh."""
    out = Path(cfg.out)
    if not rundir.has_checkpoint(out) or rundir.fit_finished(out) or cfg.overwrite:
        rundir.remove_checkpoint(out)  # none, left by a fit killed as it finished, or to be fitted afresh
        return None
    if not cfg.resume:
        raise OptionError(f"{out} holds an unfinished fit (checkpoint after an epoch): pass resume=True to "
                          f"continue it, or remove the folder, or choose another out=DIR", "resume", "out")
    state = rundir.load_checkpoint(out, CHECKPOINT_ENTRIES)
    check_same(cfg, store, state["fit"])
    if state["cache_key_hash"] != key_hash(store.key):
        raise rundir.CacheMismatchError(
            f"cannot resume {out}: it was fitted on store key {state['cache_key_hash'][:12]}, not "
            f"{key_hash(store.key)[:12]} ({store.path})")
    return state


def pause_after(epoch: int) -> None:
    """Test hook: sleep after epoch ``$TEXTDIFF_TEST_PAUSE_AFTER_EPOCH``'s checkpoint (to be killed there)."""
    if os.environ.get(PAUSE_ENV) == str(epoch):
        time.sleep(float(os.environ.get(PAUSE_ENV + "_SECONDS", "300")))
