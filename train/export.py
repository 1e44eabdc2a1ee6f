"""Export a run as a model folder to share: ``pipeline export RUN --out MODEL_DIR [--push REPO_ID]``.

The folder (:mod:`train.runs.modeldir`) follows the Hugging Face Hub's model-repository layout: ``config.json``,
``model.safetensors`` and a model card ``README.md`` whose YAML front matter (library_name, license, tags,
datasets, metrics, pipeline_tag, model-index) the Hub reads. The card says what the model was trained on
and how (data, protocol, training ids), its scores with the commands that made them, and its intended use
and limits. ``pipeline predict MODEL_DIR`` needs no store: config.json records everything stage one needs,
and the UNet and text encoder (not exported with it) are found by name (the UNet's file beside config.json or in
the models folder, or ``--unet``) and refused unless their sha256 are the recorded ones. Neither the card nor
config.json names a place on the machine that wrote them: its commands hold placeholders (``<run>``,
``--unet <adm_tiny.pt>``, ``--data-root <MoNuSeg>``). ``push`` uploads the folder with ``huggingface_hub``;
offline it is refused.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from common.errors import OptionError, naming
from cache.store import FeatureStore
from extract.command import extract_command
from extract.text import hub_offline
from train.runs import rundir
from train.config import COMMAND_MODEL, COMMAND_OPTIONS, SWITCHES, ZERO_IS_NONE, ExportConfig, FitConfig
from train.runs.modeldir import (MODEL_CARD, MODEL_CONFIG, MODEL_WEIGHTS, StageOne, is_local, is_model_dir, placeholder,
                            write_model_dir)
from train.registry import spec_of
from train.runs.loading import load_run

__all__ = ["export_run", "fit_command", "model_card", "push_model_dir", "shareable_command"]

_NAMES = {"textdiff": "TextDiff head (cross-attention on frozen diffusion features and text)",
          "plain-unet": "plain U-Net baseline (on the images alone)"}
RUN = "<run>"  #: the run folder, in the card's commands
#: the ``pipeline extract`` options whose value may be a local path (shown as :func:`train.runs.modeldir.placeholder`)
_PATH_FLAGS = ("--data-root", "--unet", "--unet-flags", "--text-encoder")


def fit_command(fit: dict[str, Any], cache: str, out: str) -> str:
    """The ``pipeline fit`` (or ``baseline``) command of a run's ``config.json`` ``fit`` entry: the options that
    differ from the defaults, spelled as :data:`train.config.COMMAND_OPTIONS` declares them (the switches of
    :data:`train.config.SWITCHES`, 0 for None where :data:`train.config.ZERO_IS_NONE`); any the command line lacks
    are named after it, as Python keywords."""
    cfg = FitConfig.from_json({**fit, "cache": cache, "out": out})
    have, default = cfg.to_json(), FitConfig(cache=cfg.cache, out=cfg.out, model=cfg.model).to_json()
    command = next(c for c, model in COMMAND_MODEL.items() if model == cfg.model)
    takes = COMMAND_OPTIONS[command]
    parts, api = [f"pipeline {command} --cache {cache} --out {out}"], []
    for key, value in have.items():
        if key in ("cache", "out", "model") or value == default.get(key):
            continue
        switch = next((n for n in takes if n in SWITCHES and SWITCHES[n].key == key and SWITCHES[n].value == value),
                      None)
        if switch is not None:
            parts.append(_flag(switch))
        elif key not in takes:
            api.append(f"{key}={value!r}")
        elif value is None and key in ZERO_IS_NONE:
            parts.append(f"{_flag(key)} 0")
        elif isinstance(value, bool):
            parts.append(_flag(key))
        else:
            parts.append(f"{_flag(key)} {','.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(parts) + (f"  (and, through the Python API: {', '.join(api)})" if api else "")


def _flag(name: str) -> str:
    """The flag of an option or switch name (``lr_drop_epoch`` → ``--lr-drop-epoch``)."""
    return "--" + name.replace("_", "-")


def _shareable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json without where things were on the machine that trained it."""
    fit = {k: v for k, v in config.get("fit", {}).items() if k not in ("cache", "out")}
    return {"model": spec_of(config).name,
            **{k: v for k, v in config.items() if k not in ("cache", "device", "fit")}, "fit": fit}


def shareable_command(command: str) -> str:
    """A command line as another machine may read it: the values of :data:`_PATH_FLAGS` and every absolute
    path as their names in angle brackets (``--data-root <MoNuSeg>``), no ``--cache-dir``."""
    words, out = shlex.split(command), []
    for before, word in zip([""] + words, words):
        if "--cache-dir" in (before, word):
            continue
        local = Path(word).is_absolute() or (before in _PATH_FLAGS and is_local(word))
        out.append(placeholder(word) if local else shlex.quote(word))
    return " ".join(out)


def _unet_file(stage: StageOne) -> str:
    """The UNet's checkpoint file name (a store that did not record it: a stand-in)."""
    return stage.unet_file or "checkpoint.pt"


def _unet_name(stage: StageOne) -> str:
    """The UNet as the card names it: its preset, or its file name in angle brackets."""
    return stage.unet_preset or f"<{_unet_file(stage)}>"


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}" if value not in (None, "") else "—"


def _card_data(config: dict[str, Any], dataset: str, scores: list[tuple[str, dict[str, Any]]]) -> str:
    """The card's YAML front matter, as the Hub reads it (huggingface_hub's ModelCardData)."""
    from huggingface_hub import EvalResult, ModelCardData

    name = f"textdiff-{spec_of(config).name}-{dataset}"
    results = [EvalResult(task_type="image-segmentation", dataset_type=dataset, dataset_name=dataset,
                          dataset_split=split, metric_type=metric, metric_name=label, metric_value=round(float(s[metric]), 6))
               for split, s in scores for metric, label in (("dice", "Dice"), ("iou", "IoU"))]
    data = ModelCardData(library_name="textdiff", license="other", license_name="unknown", datasets=[dataset],
                         metrics=["dice", "iou"], pipeline_tag="image-segmentation",
                         tags=["textdiff", "medical-imaging", "segmentation", "diffusion-features", "safetensors"],
                         model_name=name, eval_results=results or None)
    return data.to_yaml()


def _stage_one_lines(stage: StageOne, texts: bool) -> list[str]:
    """The card's lines on the (not included) UNet and text encoder of a features-reading model, by name."""
    unet, text = stage.unet, stage.text
    encoder = placeholder(stage.text_encoder_source) if stage.text_encoder_source else f"<{text.get('source_name')}>"
    return [
        f"- diffusion UNet (not included): `{_unet_name(stage)}`"
        + (f" (`{stage.unet_file}`)" if stage.unet_preset else "") + f", sha256 `{unet['weights_sha256']}`; flags "
        f"in `{MODEL_CONFIG}`; noise seed {stage.noise_seed}, compute dtype {stage.compute_dtype}, "
        f"{stage.forward_batch} samples per forward",
        f"- text encoder (not included): `{encoder}` ({text.get('source_name')}), weights "
        f"sha256 `{text['weights_sha256']}`, tokenizer sha256 `{text['tokenizer_sha256']}`, "
        f"{text['max_length']} tokens" + ("" if texts else " (this model does not read the text)"),
    ]


def _use_lines(stage: StageOne, features: bool, texts: bool) -> list[str]:
    """The card's ``## Use`` section: the predict commands and where predict finds the UNet and text encoder."""
    text = ' --text "..."' if texts else ""
    lines = ["## Use", "", "```bash", f"pipeline predict MODEL_DIR --image scan.png{text} --out mask.png",
             "pipeline predict MODEL_DIR --images scans/" + (" --texts texts.csv" if texts else "") + " --out masks/"]
    if not features:
        return [*lines, "```", ""]
    return [*lines, f"pipeline predict MODEL_DIR --image scan.png{text} --out mask.png --unet <{_unet_file(stage)}>",
            "```", "",
            f"`predict` finds the UNet `{_unet_file(stage)}` beside `{MODEL_CONFIG}`, then in the models folder "
            "(`$TEXTDIFF_MODELS_DIR`, default `~/.cache/textdiff/models`); `--unet PATH` where it is elsewhere, "
            "`--text-encoder NAME_OR_DIR` where the text encoder named above is. One whose sha256 differs from the "
            "recorded one is refused (its features would not be the ones the model was trained on).", ""]


def model_card(run: Path, config: dict[str, Any], stage: StageOne, store: FeatureStore, parameters: int) -> str:
    """The model card (README.md): front matter, then the model, data, protocol, metrics with their
    commands, how to use it, and its intended use and limits; local paths as placeholders (``<run>``)."""
    run = Path(run)
    spec, fit = spec_of(config), config.get("fit", {})
    dataset = store.key["dataset"]
    name = str(config.get("dataset") or dataset.get("name") or "unknown")
    metrics = rundir.read_metrics(run)
    scores = [(split, rundir.read_summary(run, split, entries=rundir.SCORE_ENTRIES))
              for split in rundir.evaluated_splits(run)]
    with rundir.reading(run / rundir.CONFIG):  # its fit settings, read as today's FitConfig reads them
        fit_cmd = fit_command(fit, f"<{Path(str(store.path)).name}>", RUN)
    val = config.get("val", {})
    texts, features = spec.needs_text(config["head"]), spec.reads_features
    rows = [f"| {val.get('split', 'val')} (validation, best epoch {metrics.get('best_epoch')}) | "
            f"{_pct(metrics.get('best_val_dice'))} | {_pct(metrics.get('best_val_iou'))} | — | "
            f"{metrics.get('n_val', '—')} | `{fit_cmd}` |"]
    rows += [f"| {split} | {_pct(s['dice'])} ± {_pct(s['dice_std'])} | {_pct(s['iou'])} ± {_pct(s['iou_std'])} | "
             f"{_pct(s['global_dice'])} | {s['n_images']} | `pipeline evaluate {RUN} --split {split}` |"
             for split, s in scores]
    text = stage.text
    reads = (f"the UNet's decoder blocks {config['blocks']} at diffusion steps {config['steps']}"
             + (f" and the text's tokens ({text.get('source_name')}, {text['max_length']} tokens)" if texts else "")
             if features else "the image alone")
    lines = [
        "---", _card_data(config, name, scores).rstrip(), "---", "",
        f"# textdiff: {_NAMES.get(spec.name, spec.name)}, {name}", "",
        f"A {_NAMES.get(spec.name, spec.name)} trained with textdiff (TextDiff: label-efficient medical image "
        f"segmentation with text-guided diffusion features) on `{name}`; it reads {reads}, at {stage.size}×{stage.size} px. "
        f"{parameters:,} parameters. Files: `{MODEL_CONFIG}` (what stage one and the model need), "
        f"`{MODEL_WEIGHTS}` (the weights; no pickle), this card.", "",
        "## Model", "",
        f"- constructor arguments: `{json.dumps(config['head'])}`",
        f"- preprocessing: `{json.dumps(stage.preprocessing)}`",
        *(_stage_one_lines(stage, texts) if features else []),
        "", "## Data", "",
        f"- dataset `{name}` ({dataset.get('layout', 'generated')}), images per split "
        f"`{json.dumps(dataset.get('counts', {}))}`, texts sha256 `{dataset.get('texts_sha256', '')}`",
        f"- feature store key `{stage.key_hash[:12]}` (full hash in `{MODEL_CONFIG}`: `store_key_hash`)",
        f"- training images ({len(config.get('train_ids', []))}, split `{config.get('train_split', 'train')}`): "
        f"{', '.join(f'`{i}`' for i in config.get('train_ids', []))}",
        f"- validation ({len(val.get('ids', []))} images, split `{val.get('split', '')}`): the best epoch's weights "
        "are kept", "",
        "## Protocol", "",
        f"- stage one: `{shareable_command(extract_command(store))}`",
        f"- stage two: `{fit_cmd}`",
        f"- settings: `{json.dumps({k: v for k, v in fit.items() if k not in ('cache', 'out')})}`", "",
        "## Metrics", "",
        "Dice and IoU per image, averaged (%, ± standard deviation over images); global Dice pools all pixels.", "",
        "| split | Dice | IoU | global Dice | images | command |", "|---|---|---|---|---|---|", *rows, "",
        *_use_lines(stage, features, texts),
        *_limits_lines(config, stage, name, texts),
    ]
    return "\n".join(lines)


def _limits_lines(config: dict[str, Any], stage: StageOne, name: str, texts: bool) -> list[str]:
    """The card's ``## Intended use and limits`` section."""
    return [
        "## Intended use and limits", "",
        f"- Research on label-efficient segmentation: trained on {len(config.get('train_ids', []))} labelled "
        f"`{name}` images; not a medical device, not validated for diagnosis or any clinical decision.",
        f"- Inputs like the training images (modality, {stage.color_order.upper()}, resized to {stage.size} px)"
        + (", and texts written like the training captions: the head attends to them, and texts unlike them (or "
           "empty) give other masks" if texts else "") + ".",
        "- The scores above are on this dataset's splits; expect lower ones on other scanners, sites or populations.",
        "- The license of the weights follows that of the training data and of the diffusion UNet and text encoder "
        "used for stage one (hence `license: other`).", "",
    ]


def push_model_dir(folder: Path, repo_id: str) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if need be); its URL. Offline
    (HF_HUB_OFFLINE) refused, and a failed upload is one :class:`OSError` line."""
    if hub_offline():
        raise OptionError(f"push: HF_HUB_OFFLINE is set, so nothing can be uploaded; the model folder {folder} "
                          "can be pushed later where a network is (push=REPO_ID)", "push")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="textdiff export")
    except Exception as e:  # noqa: BLE001 - no network, no token, no rights: one line naming the cause
        detail = " ".join(str(e).split())[:300]
        raise naming(OSError(f"push: uploading {folder} to the Hub repository {repo_id} failed "
                             f"({type(e).__name__}: {detail}); the folder is written, push it again with "
                             "push=REPO_ID"), "push") from None
    return f"https://huggingface.co/{repo_id}"


def export_run(run: Path, out: Path | None = None, cache: Path | str | None = ExportConfig.cache,
               push: str | None = ExportConfig.push, console: Console | None = None,
               config: ExportConfig | None = None) -> str:
    """Write the model folder ``out`` of the finished run ``run`` (its store: ``cache`` or the one it recorded,
    for the key and what made it); with ``push``, upload it to that Hub repository. Returns the folder (or
    the repository's URL). A non-empty ``out`` that is not a model folder is refused; one is rewritten. The
    options are :class:`train.config.ExportConfig`'s: given one by one, or as ``config`` (which then wins)."""
    if config is not None:
        out, cache, push = config.out, config.cache, config.push
    if out is None:
        raise OptionError("out: the model folder to write is missing; pass out=DIR", "out")
    console = console or Console(stderr=True)
    run, out = Path(run), Path(out)
    if push and hub_offline():  # before any work
        push_model_dir(out, push)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_model_dir(out))):
        raise OptionError(f"out: {out} exists and is not a model folder written by `pipeline export`; pass another "
                          "out=DIR", "out")
    recorded, model, store = load_run(run, cache, "cpu")
    stage = StageOne.of_store(store)
    parameters = sum(p.numel() for p in model.parameters())
    card = model_card(run, recorded, stage, store, parameters)
    write_model_dir(out, {**_shareable(recorded), **stage.to_json()}, model.state_dict(), card)
    console.print(f"export: {escape(str(run))} → {escape(str(out))} ({MODEL_CONFIG}, {MODEL_WEIGHTS}, {MODEL_CARD})",
                  highlight=False, soft_wrap=True)
    return push_model_dir(out, push) if push else str(out)
