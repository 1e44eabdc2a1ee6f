"""Stage two: models trained from the feature store, their run folders, and the loops.

Module map::

    config.py      what the commands take (no torch): FitConfig (the training options + the model and its
                   own arguments: TextDiffArgs, PlainUNetArgs), DemoConfig
    models.py      the model registry (textdiff, plain-unet), the one forward pass, load_run
    model.py       the TextDiff head (TextDiffHead)
    plain_unet.py  the plain U-Net baseline (PlainUNet) and the store it trains on
    data.py        a split as a model reads it: SplitFeatures / SplitImages → Sample / ImageSample
    rundir.py      the run folder: file names, atomic writes, INCOMPLETE, the cache-key check
    fit.py         fit: train a registered model, keep the best epoch
    evaluate.py    evaluate: score a run on a split (per_image.csv, summary.json, overlays)
    textmodes.py   the text a head is given: evaluate --text (as-is, none, shuffled, mirrored), fit --text-dropout
    predict.py     Predictor / predict: segment new images with a run (or an exported model folder)
    predict_batch.py  predict_batch: a folder or a table of images → masks, probabilities, predictions.csv
    modeldir.py    the exported model folder (config.json, model.safetensors, README.md) and StageOne
    export.py      export_run: a run → a model folder to share (Hugging Face Hub layout; push)
    sweep.py       sweep: the paper's Fig. 3 (one fit per block / step, with and without text)
    demo.py        run_demo: synthetic data → pretrain → extract → fit → evaluate → report
    report.py, plots.py, losses.py, metrics.py   the demo's report, figures, loss, metrics

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

_MODULES = ("fit", "evaluate", "predict", "predict_batch", "export", "sweep")
_LOOPS = {"run_fit": ("train.fit", "fit"), "run_evaluate": ("train.evaluate", "evaluate"),
          "run_predict": ("train.predict", "predict"), "run_predict_batch": ("train.predict_batch", "predict_batch"),
          "run_export": ("train.export", "export_run"), "run_sweep": ("train.sweep", "sweep")}
_HOME = {
    "FitConfig": "train.config",
    "Predictor": "train.predict",
    "PredictConfig": "train.config",
    "ExportConfig": "train.config",
    "StageOne": "train.modeldir",
    "load_model_dir": "train.models",
    "run_demo": "train.demo",
    "DemoConfig": "train.config",
    "MODELS": "train.models",
    "ModelSpec": "train.models",
    "model_spec": "train.models",
    "load_run": "train.models",
    "probabilities": "train.models",
    "TextDiffArgs": "train.config",
    "TextDiffHead": "train.model",
    "PlainUNetArgs": "train.config",
    "PlainUNet": "train.plain_unet",
    "CacheMismatchError": "train.rundir",
    "eval_dir": "train.rundir",
    "evaluated": "train.rundir",
    "fit_finished": "train.rundir",
}

__all__ = sorted([*_HOME, *_LOOPS, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"train.{name}")
    if name in _LOOPS:
        module, function = _LOOPS[name]
        return getattr(importlib.import_module(module), function)
    if name not in _HOME:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
