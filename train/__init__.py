"""Stage two: models trained from the feature store, their run folders, and the loops.

Layout, by job (a layers contract in pyproject.toml keeps the order; each sub-package's docstring lists its
modules)::

    config.py      what the commands take (no torch): FitConfig, TextDiffArgs, PlainUNetArgs, EvaluateConfig, ...
    nets/          the networks: the TextDiff head, its fast convolution, the plain U-Net, the loss
    data/          a split as a model reads it (samples, readers, the few-shot subset), the training feed
    registry.py    the models (class, arguments, reader, new-image inputs) and the one forward pass
    runs/          run and model folders: files, resume, the checked stage one, loading a run's model
    textmodes.py   the text a head is given: evaluate --text (as-is, none, shuffled, mirrored), fit --text-dropout
    fit.py         fit: train a registered model, keep the best epoch
    evaluate.py    evaluate: score a run on a split (per_image.csv, summary.json, overlays)
    inference/     Predictor / predict (one image), predict_batch (a folder or a table)
    export.py      export_run: a run → a model folder to share (Hugging Face Hub layout; push)
    sweep.py       sweep: the paper's Fig. 3 (one fit per block / step, with and without text)
    demo/          run_demo: synthetic data → pretrain → extract → fit → evaluate → report
    metrics.py, plots.py   LViT's metrics, the figures

Names are imported on first use, so ``import train`` stays light (``predict`` loads the UNet's code).
The loops are exported as ``run_<loop>`` (as ``extract.run_extract``): ``train.fit`` and its siblings
are the modules, and ``import train.fit`` would rebind a package attribute of that name::

    import train
    cfg = train.FitConfig(cache=store, out=run, model_args=train.TextDiffArgs(dim=64))
    train.run_fit(cfg)
    train.run_evaluate(run)
    mask = train.run_predict(run, image, text, out="mask.png")   # or train.Predictor.from_run(run)
    train.run_predict_batch(run, images="scans/", texts="texts.csv", out="masks/")
    train.run_export(run, out="model/")                          # then train.run_predict("model/", ...)
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {"fit": "train.fit", "evaluate": "train.evaluate", "predict": "train.inference.predictor",
            "predict_batch": "train.inference.batch", "export": "train.export", "sweep": "train.sweep"}
_LOOPS = {"run_fit": ("train.fit", "fit"), "run_evaluate": ("train.evaluate", "evaluate"),
          "run_predict": ("train.inference.predictor", "predict"), "run_predict_batch": ("train.inference.batch", "predict_batch"),
          "run_export": ("train.export", "export_run"), "run_sweep": ("train.sweep", "sweep")}
_HOME = {
    "FitConfig": "train.config",
    "Predictor": "train.inference.predictor",
    "PredictConfig": "train.config",
    "ExportConfig": "train.config",
    "StageOne": "train.runs.modeldir",
    "load_model_dir": "train.runs.loading",
    "run_demo": "train.demo.run",
    "DemoConfig": "train.config",
    "MODELS": "train.registry",
    "ModelSpec": "train.registry",
    "model_spec": "train.registry",
    "load_run": "train.runs.loading",
    "probabilities": "train.registry",
    "TextDiffArgs": "train.config",
    "TextDiffHead": "train.nets.head",
    "PlainUNetArgs": "train.config",
    "PlainUNet": "train.nets.plain_unet",
    "CacheMismatchError": "train.runs.rundir",
    "eval_dir": "train.runs.rundir",
    "evaluated": "train.runs.rundir",
    "fit_finished": "train.runs.rundir",
}

__all__ = sorted([*_HOME, *_LOOPS, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    if name in _LOOPS:
        module, function = _LOOPS[name]
        return getattr(importlib.import_module(module), function)
    if name not in _HOME:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
